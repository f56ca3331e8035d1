"""The wheel holds every package of the source tree: pyproject lists packages by hand (kernels/
and export/ are mapped onto fastddpm.kernels / fastddpm.export), and a package missing from
that list is left out of a regular install while an editable one still imports it."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _source_packages() -> set[str]:
    """Dotted names of every folder with an __init__.py, under the names it installs as."""
    tops = {"fastddpm": ROOT / "fastddpm", "fastddpm.kernels": ROOT / "kernels",
            "fastddpm.export": ROOT / "export"}
    found = set()
    for name, folder in tops.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_source_package_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert _source_packages() - listed == set(), "add these to [tool.setuptools] packages"
    assert config["package-dir"] == {"fastddpm": "fastddpm", "fastddpm.kernels": "kernels",
                                     "fastddpm.export": "export"}
