"""The C++ sampler (export/cpp/main.cpp) against hostile input: hand-made step graphs that lie
about their shapes, types and metadata, and bad command lines.

Each bad case must end with exit code 2 and exactly one line on stderr, leave the output folder
byte-identical (a pre-existing --out untouched, no --raw-out, no `*.tmp.<pid>` file) — and, in
the sanitized build, without an AddressSanitizer/UBSan report (test_export_cpp.Sampler.run
fails on one). The graphs are a few nodes each, built with onnx.helper; their metadata has the
keys and JSON fields of a real export (fastddpm.export.onnx.metadata)."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_export_cpp import COUNT, VARIANTS, Sampler, sampler_build, step_graph  # noqa: F401
from test_export_cpp import pytestmark as pytestmark  # the same skip without cmake / ORT headers

from fastddpm.export.runners import OrtRunner
from fastddpm.export.step_loop import sample_with_step_graph, write_noise_file

OPSET = 21
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
IMAGE = ["N", 3, 8, 8]  # a dynamic batch, as `fastddpm export --batch dynamic` writes
STEPS = 3


@pytest.fixture(scope="module", params=VARIANTS)
def sampler(request, tmp_path_factory) -> Sampler:
    return sampler_build(request.param, tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# crafted graphs


def _props(num_steps=STEPS, history=0, channels=3, size=8, json_text=None, history_kind=None,
           **flat) -> dict[str, str]:
    """The metadata of a real step-graph export, with any value replaced; `history_kind` None
    leaves it out in both places, as graphs exported before it existed do."""
    info = {"graph": "step", "dtype": "fp32", "batch": "dynamic", "opset": OPSET,
            "unet": {"image_size": size, "in_channels": channels, "out_channels": channels},
            "sampler": {"name": "ddpm", "steps": num_steps, "num_steps": num_steps,
                        "history": history, "timesteps": list(range(num_steps))}}
    if history_kind is not None:
        info["sampler"]["history_kind"] = history_kind
        flat = {"history_kind": history_kind, **flat}
    props = {"fastddpm": json.dumps(info) if json_text is None else json_text, "fastddpm.graph": "step",
             "fastddpm.num_steps": str(num_steps), "fastddpm.history": str(history)}
    props.update({f"fastddpm.{key}": value for key, value in flat.items()})
    return {key: value for key, value in props.items() if value is not None}


def _tensor(name, elem=FLOAT, shape=None):
    return helper.make_tensor_value_info(name, elem, IMAGE if shape is None else shape)


def _const(name, array):
    value = onnx.numpy_helper.from_array(np.asarray(array), name)
    return helper.make_node("Constant", [], [name], value=value)


def _graph(path: Path, nodes=None, inputs=None, outputs=None, props=None) -> Path:
    """A step graph: by default an honest one (x_prev = x + 0·noise, x0 = x), with IMAGE shapes."""
    if nodes is None:
        nodes = [_const("zero", np.float32(0)), helper.make_node("Mul", ["noise", "zero"], ["z0"]),
                 helper.make_node("Add", ["x", "z0"], ["x_prev"]),
                 helper.make_node("Identity", ["x"], ["x0"])]
    if inputs is None:
        inputs = [_tensor("x"), _tensor("step", INT64, [1]), _tensor("noise")]
    if outputs is None:
        outputs = [_tensor("x_prev"), _tensor("x0")]
    model = helper.make_model(helper.make_graph(nodes, "step", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    helper.set_model_props(model, _props() if props is None else props)
    onnx.save(model, str(path))
    return path


def _x0(*more):
    return [*more, helper.make_node("Identity", ["x"], ["x0"])]


def _slice(out, starts, ends, axes):
    """out = x[starts:ends] along axes, with the bounds as constants."""
    return [_const(f"{out}_s", np.array(starts, np.int64)), _const(f"{out}_e", np.array(ends, np.int64)),
            _const(f"{out}_a", np.array(axes, np.int64)),
            helper.make_node("Slice", ["x", f"{out}_s", f"{out}_e", f"{out}_a"], [out])]


def _opaque(src, out):
    """out = src, through a Slice whose bounds depend on `step`: ONNX Runtime's shape inference
    then knows nothing of out's dims, so the graph's declared (N, 3, 8, 8) stands however wrong —
    only the sampler's run-time check of what Run returned can catch it."""
    ends, zeros, axes = f"{out}_ends", f"{out}_zeros", f"{out}_axes"
    return [_const(f"{out}_big", np.full(4, 2**62, np.int64)),
            helper.make_node("Add", ["step", f"{out}_big"], [ends]),
            _const(zeros, np.zeros(4, np.int64)), _const(axes, np.arange(4, dtype=np.int64)),
            helper.make_node("Slice", [src, zeros, ends, axes], [out])]


def _cast(to):
    return _x0(helper.make_node("Cast", ["x"], ["x_prev"], to=to))


def _ring_graph(folder: Path, ring: str, kind: str) -> Path:
    """The honest graph (outputs x_prev, x0) with a 2-slot ring input `ring`, metadata history 2
    of `kind`."""
    inputs = [_tensor("x"), _tensor("step", INT64, [1]), _tensor("noise"), _tensor(ring, shape=[2, *IMAGE])]
    return _graph(folder / "g.onnx", inputs=inputs, props=_props(history=2, history_kind=kind))


SYMBOLIC = ["N", "C", "H", "W"]  # what a graph may declare to hide its real output shape

# name → (graph builder over a folder, what the one-line error must say)
GRAPHS = {
    # x_prev smaller than x: declared so, ORT's shape inference reports it at load ...
    "x_prev_slice_declared": (lambda d: _graph(d / "g.onnx", _x0(*_slice("x_prev", [0], [4], [2])),
                                               outputs=[_tensor("x_prev", shape=SYMBOLIC), _tensor("x0")]),
                              "'x_prev' has shape (?, 3, 4, 8); the metadata's U-Net config and --count say"),
    # ... and hidden from it behind a declared (N, 3, 8, 8): only the run-time check can tell
    "x_prev_slice_of_x": (
        lambda d: _graph(d / "g.onnx", _x0(*_slice("s", [0], [4], [2]), *_opaque("s", "x_prev"))),
        "at step 0 the graph returned 'x_prev' of shape (5, 3, 4, 8), not (5, 3, 8, 8)"),
    # right at step 0, one image short from step 1 on (x[:COUNT - step])
    "x_prev_shrinks_at_step_1": (
        lambda d: _graph(d / "g.onnx", _x0(
            _const("count", np.array([COUNT], np.int64)), helper.make_node("Sub", ["count", "step"], ["end"]),
            _const("start", np.array([0], np.int64)), _const("axis", np.array([0], np.int64)),
            helper.make_node("Slice", ["x", "start", "end", "axis"], ["x_prev"]))),
        "at step 1 the graph returned 'x_prev' of shape (4, 3, 8, 8), not (5, 3, 8, 8)"),
    "x_prev_constant_one_image": (
        lambda d: _graph(d / "g.onnx", _x0(_const("c", np.zeros((1, 3, 8, 8), np.float32)),
                                           *_opaque("c", "x_prev"))),
        "returned 'x_prev' of shape (1, 3, 8, 8), not (5, 3, 8, 8)"),
    "x_prev_constant_scalar": (
        lambda d: _graph(d / "g.onnx", _x0(_const("x_prev", np.float32(0)))),
        "'x_prev' has rank 0"),
    "x0_smaller_than_x": (
        lambda d: _graph(d / "g.onnx", [helper.make_node("Identity", ["x"], ["x_prev"]),
                                        *_slice("s", [0], [1], [1]), *_opaque("s", "x0")]),
        "returned 'x0' of shape (5, 1, 8, 8)"),
    "x_prev_bigger_than_x": (
        lambda d: _graph(d / "g.onnx", _x0(helper.make_node("Concat", ["x", "x"], ["c"], axis=0),
                                           *_opaque("c", "x_prev"))),
        "returned 'x_prev' of shape (10, 3, 8, 8)"),
    "x_prev_same_count_other_shape": (
        lambda d: _graph(d / "g.onnx", _x0(_const("shape", np.array([5, 3, 64, 1], np.int64)),
                                           helper.make_node("Reshape", ["x", "shape"], ["r"]),
                                           *_opaque("r", "x_prev"))),
        "returned 'x_prev' of shape (5, 3, 64, 1)"),
    "x_prev_float16": (lambda d: _graph(d / "g.onnx", _cast(TensorProto.FLOAT16),
                                        outputs=[_tensor("x_prev", TensorProto.FLOAT16), _tensor("x0")]),
                       "'x_prev' is float16, not float32"),
    "x_prev_float64": (lambda d: _graph(d / "g.onnx", _cast(TensorProto.DOUBLE),
                                        outputs=[_tensor("x_prev", TensorProto.DOUBLE), _tensor("x0")]),
                       "'x_prev' is float64, not float32"),
    "x_prev_int64": (lambda d: _graph(d / "g.onnx", _cast(INT64),
                                      outputs=[_tensor("x_prev", INT64), _tensor("x0")]),
                     "'x_prev' is int64, not float32"),
    "x_float16": (lambda d: _graph(d / "g.onnx", [helper.make_node("Cast", ["x"], ["x_prev"], to=FLOAT),
                                                  helper.make_node("Cast", ["x"], ["x0"], to=FLOAT)],
                                   inputs=[_tensor("x", TensorProto.FLOAT16), _tensor("step", INT64, [1]),
                                           _tensor("noise")]),
                  "'x' is float16, not float32"),
    "x_rank_3": (lambda d: _graph(d / "g.onnx", inputs=[_tensor("x", shape=["N", 3, 64]),
                                                        _tensor("step", INT64, [1]),
                                                        _tensor("noise", shape=["N", 3, 64])],
                                  outputs=[_tensor("x_prev", shape=["N", 3, 64]),
                                           _tensor("x0", shape=["N", 3, 64])]),
                 "'x' has rank 3"),
    "x_prev_rank_5": (
        lambda d: _graph(d / "g.onnx", _x0(_const("axes", np.array([0], np.int64)),
                                           helper.make_node("Unsqueeze", ["x", "axes"], ["x_prev"])),
                         outputs=[_tensor("x_prev", shape=[1, *IMAGE]), _tensor("x0")]),
        "'x_prev' has rank 5"),
    "step_float": (lambda d: _graph(d / "g.onnx", inputs=[_tensor("x"), _tensor("step", FLOAT, [1]),
                                                          _tensor("noise")]),
                   "'step' is float32, not int64"),
    "step_rank_2": (lambda d: _graph(d / "g.onnx", inputs=[_tensor("x"), _tensor("step", INT64, [1, 1]),
                                                           _tensor("noise")]),
                    "'step' has rank 2"),
    "wrong_channels": (lambda d: _graph(d / "g.onnx", inputs=[_tensor("x", shape=["N", 1, 8, 8]),
                                                              _tensor("step", INT64, [1]),
                                                              _tensor("noise", shape=["N", 1, 8, 8])],
                                        outputs=[_tensor("x_prev", shape=["N", 1, 8, 8]),
                                                 _tensor("x0", shape=["N", 1, 8, 8])]),
                       "has shape (?, 1, 8, 8)"),
    "image_size_disagrees_with_metadata": (lambda d: _graph(d / "g.onnx", props=_props(size=16)),
                                           "has shape (?, 3, 8, 8)"),
    "fixed_batch_not_count": (
        lambda d: _graph(d / "g.onnx", inputs=[_tensor("x", shape=[2, 3, 8, 8]), _tensor("step", INT64, [1]),
                                               _tensor("noise", shape=[2, 3, 8, 8])],
                         outputs=[_tensor("x_prev", shape=[2, 3, 8, 8]), _tensor("x0", shape=[2, 3, 8, 8])]),
        "exported for batch 2; pass --count 2"),
    "missing_output_x0": (lambda d: _graph(d / "g.onnx", [helper.make_node("Identity", ["x"], ["x_prev"])],
                                           outputs=[_tensor("x_prev")]),
                          "no output 'x0'"),
    "missing_output_x_prev": (lambda d: _graph(d / "g.onnx", [helper.make_node("Identity", ["x"], ["x0"])],
                                               outputs=[_tensor("x0")]),
                              "no output 'x_prev'"),
    "extra_output": (lambda d: _graph(d / "g.onnx", _x0(helper.make_node("Identity", ["x"], ["x_prev"]),
                                                        helper.make_node("Identity", ["x"], ["y"])),
                                      outputs=[_tensor("x_prev"), _tensor("x0"), _tensor("y")]),
                     "unexpected graph output \"y\""),
    "missing_input_noise": (
        lambda d: _graph(d / "g.onnx", _x0(helper.make_node("Identity", ["x"], ["x_prev"])),
                         inputs=[_tensor("x"), _tensor("step", INT64, [1])]),
        "no input 'noise'"),
    "extra_input": (lambda d: _graph(d / "g.onnx", inputs=[_tensor("x"), _tensor("step", INT64, [1]),
                                                           _tensor("noise"), _tensor("y")]),
                    "unexpected graph input \"y\""),
    "x0_history_input_but_metadata_says_0": (
        lambda d: _graph(d / "g.onnx", inputs=[_tensor("x"), _tensor("step", INT64, [1]), _tensor("noise"),
                                               _tensor("x0_history", shape=[2, *IMAGE])]),
        "has an input x0_history but its metadata fastddpm.history is 0"),
    "metadata_says_history_but_no_input": (lambda d: _graph(d / "g.onnx", props=_props(history=2)),
                                           "fastddpm.history is 2 but the graph has no input x0_history"),
    # a ring of 2 slots declared, 3 in the metadata: the C++ buffer would be read past its end
    "x0_history_slots_disagree": (
        lambda d: _graph(d / "g.onnx", inputs=[_tensor("x"), _tensor("step", INT64, [1]), _tensor("noise"),
                                               _tensor("x0_history", shape=[2, *IMAGE])],
                         props=_props(history=3)),
        "graph input 'x0_history' has shape (2, ?, 3, 8, 8); the metadata's U-Net config and --count say "
        "(3, 5, 3, 8, 8)"),
    "x0_history_rank_4": (
        lambda d: _graph(d / "g.onnx", inputs=[_tensor("x"), _tensor("step", INT64, [1]), _tensor("noise"),
                                               _tensor("x0_history")],
                         props=_props(history=1)),
        "graph input 'x0_history' has rank 4; a step graph's is 5"),
    # an ε ring named where the metadata says x0, and an ε ring's graph without its eps output
    "eps_history_input_but_kind_x0": (lambda d: _ring_graph(d, "eps_history", "x0"),
                                      "has an input eps_history but its metadata's history_kind is x0"),
    "x0_history_input_but_kind_eps": (lambda d: _ring_graph(d, "x0_history", "eps"),
                                      "has an input x0_history but its metadata's history_kind is eps"),
    "eps_ring_without_eps_output": (lambda d: _ring_graph(d, "eps_history", "eps"), "no output 'eps'"),
    "nan_output": (lambda d: _graph(d / "g.onnx", _x0(_const("nan", np.float32(np.nan)),
                                                      helper.make_node("Add", ["x", "nan"], ["x_prev"]))),
                   "NaN or infinity"),
    # ONNX Runtime fails inside Run (a Reshape to a size computed from `step`): its exception and
    # its own error log must still make one line
    "ort_fails_at_run_time": (
        lambda d: _graph(d / "g.onnx", _x0(_const("shape", np.array([7, 1, 1, 1], np.int64)),
                                           helper.make_node("Add", ["step", "shape"], ["s"]),
                                           helper.make_node("Reshape", ["x", "s"], ["x_prev"]))),
        "Reshape"),
}

# metadata values → what the error must say; on the honest graph
METADATA = {
    "num_steps_minus_1": (dict(num_steps="-1"), "num_steps must be an integer in 1..100000, not \"-1\""),
    "num_steps_0": (dict(num_steps="0"), "num_steps must be an integer in 1..100000, not \"0\""),
    "num_steps_abc": (dict(num_steps="abc"), "not \"abc\""),
    "num_steps_suffix": (dict(num_steps="3x"), "not \"3x\""),
    "num_steps_space": (dict(num_steps=" 3"), "not \" 3\""),
    "num_steps_empty": (dict(num_steps=""), "not \"\""),
    "num_steps_float": (dict(num_steps="3.0"), "not \"3.0\""),
    "num_steps_newline": (dict(num_steps="3\n4"), "not \"3\\x0a4\""),
    "num_steps_huge": (dict(num_steps="100001"), "not \"100001\""),
    "num_steps_overflow": (dict(num_steps="99999999999999999999999"), "not \"99999999999999999999999\""),
    "num_steps_missing": (dict(num_steps=None), "no 'fastddpm.num_steps' metadata"),
    "history_9": (dict(history="9"), "fastddpm.history must be an integer in 0..8, not \"9\""),
    "history_negative": (dict(history="-1"), "history must be an integer in 0..8, not \"-1\""),
    "history_true": (dict(history="true"), "history must be an integer in 0..8, not \"true\""),
    "history_empty": (dict(history=""), "history must be an integer in 0..8, not \"\""),
    "history_missing": (dict(history=None), "no 'fastddpm.history' metadata"),
    "history_kind_unknown": (dict(history_kind="v"), "fastddpm.history_kind must be x0 or eps, not \"v\""),
    "history_kind_upper": (dict(history_kind="EPS"), "history_kind must be x0 or eps, not \"EPS\""),
    "history_kind_empty": (dict(history_kind=""), "history_kind must be x0 or eps, not \"\""),
    "history_kind_only_flat": (dict(history_kind="x0"),
                               "fastddpm.history_kind and the JSON's sampler.history_kind differ"),
    "graph_eps": (dict(graph="eps"), "is not a step graph"),
    "no_graph_key": (dict(graph=None), "no 'fastddpm.graph' metadata"),
}


def _metadata_graph(folder: Path, flat: dict) -> Path:
    props = _props()
    props.update({f"fastddpm.{key}": value for key, value in flat.items()})
    return _graph(folder / "g.onnx", props={k: v for k, v in props.items() if v is not None})


def _info(**changes):
    """The metadata JSON of _props() with fields replaced ("unet.in_channels": 3.0)."""
    info = json.loads(_props()["fastddpm"])
    for path, value in changes.items():
        node = info
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    return json.dumps(info)


JSON = {
    "not_json": ("{", "not valid JSON (expected a key at offset 1)"),
    "truncated": (_info()[:-10], "not valid JSON"),
    "empty": ("", "not valid JSON (unexpected end at offset 0)"),
    "trailing_text": (_info() + "x", "not valid JSON (text after the value"),
    "deep_nesting": ("[" * 100000 + "]" * 100000, "nesting deeper than 64"),
    "bad_escape": ('{"unet": "\\q"}', "bad escape"),
    "bad_unicode_escape": ('{"unet": "\\u00g0"}', "bad \\u escape"),
    "control_char_in_unicode_escape": ('{"unet": "\\u\x10\x10\x10\x10"}', "bad \\u escape"),
    "unterminated_string": ('{"unet": "abc', "unterminated string"),
    "control_char": ('{"unet": "\x01"}', "control character"),
    "bad_number": ('{"unet": 01}', "expected ',' or '}'"),
    "nan_literal": ('{"unet": NaN}', "unexpected character"),
    "not_an_object": ("[1, 2]", "no unet"),
    "no_unet": (_info(unet=None), "has no unet"),
    "no_sampler": (_info(sampler=None), "has no sampler"),
    "channels_float": (_info(**{"unet.in_channels": 3.0}),
                       "unet.in_channels must be an integer in 1..4096, not \"3.0\""),
    "channels_string": (_info(**{"unet.in_channels": "3"}), "unet.in_channels is not a number"),
    "channels_exponent": (_info(**{"unet.in_channels": 3e300}), "not \"3e+300\""),
    "channels_0": (_info(**{"unet.in_channels": 0}), "in_channels must be an integer in 1..4096, not \"0\""),
    "channels_4": (_info(**{"unet.in_channels": 4}), "has 4 channels; the PGM/PPM grid needs 1 or 3"),
    "image_size_negative": (_info(**{"unet.image_size": -8}), "image_size must be an integer in 1..65536"),
    "image_size_huge": (_info(**{"unet.image_size": 65536}),
                        "a batch of 5 images of 3 x 65536 x 65536 floats is too large"),
    "duplicate_key": ('{"unet": {"in_channels": 3, "in_channels": 1, "image_size": 8}, "sampler": {}}',
                      "has unet.in_channels twice"),
    "num_steps_disagree": (_info(**{"sampler.num_steps": 4}), "num_steps and the JSON's sampler.num_steps"),
    "history_disagree": (_info(**{"sampler.history": 2}), "fastddpm.history and the JSON's sampler.history"),
    "history_not_int": (_info(**{"sampler.history": False}), "sampler.history is not a number"),
    "history_float": (_info(**{"sampler.history": 0.0}), "sampler.history must be an integer in 0..8"),
    "no_history": (_info(**{"sampler.history": None}), "has no sampler.history"),
    "history_kind_not_string": (_info(**{"sampler.history_kind": 0}), "sampler.history_kind is not a string"),
    "history_kind_only_json": (_info(**{"sampler.history_kind": "x0"}),
                               "fastddpm.history_kind and the JSON's sampler.history_kind differ"),
}


# ---------------------------------------------------------------------------------------------
# running a bad case


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def _argv(out_dir: Path, graph, **flags) -> list:
    """The command line of a normal run of `graph`, with flags replaced (None drops the flag)."""
    argv = {"--model": graph, "--count": COUNT, "--seed": 0, "--out": out_dir / "grid.ppm",
            "--raw-out": out_dir / "x.f32"}
    argv.update({f"--{key.replace('_', '-')}": value for key, value in flags.items()})
    return [token for key, value in argv.items() if value is not None for token in (key, value)]


def _refused(sampler: Sampler, out_dir: Path, argv, says: str) -> str:
    """Runs a bad case: exit 2, one line saying `says`, the output folder unchanged."""
    (out_dir / "grid.ppm").write_bytes(b"P6\n1 1\n255\nabc")  # a previous run's output, to keep
    before = _snapshot(out_dir)
    done = sampler.run(*argv)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and done.stderr.endswith("\n"), done.stderr
    assert lines[0].startswith("fastddpm_sample: error: "), lines[0]
    assert says in lines[0], lines[0]
    assert done.stdout == ""
    assert _snapshot(out_dir) == before  # no output, no temp file, the old grid byte-identical
    return lines[0]


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "model", tmp_path / "out"


def test_the_honest_crafted_graph_runs(sampler, folders):
    """The baseline every bad graph is one lie away from: it samples, and writes both outputs."""
    model_dir, out_dir = folders
    (out_dir / "grid.ppm").write_bytes(b"old")
    done = sampler.run(*_argv(out_dir, _graph(model_dir / "g.onnx"), count=2))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["grid.ppm", "x.f32"]  # no temp file
    assert np.fromfile(out_dir / "x.f32", dtype="<f4").size == 2 * 3 * 8 * 8
    assert (out_dir / "grid.ppm").read_bytes().startswith(b"P6\n")


@pytest.mark.parametrize("kind", ["x0", "eps", None], ids=["x0-ring", "eps-ring", "x0-ring-no-kind"])
def test_the_ring_is_kept_as_the_python_loop_keeps_it(sampler, folders, kind):
    """A crafted multistep graph, x_prev = x/2 + Σ_k w_k·ring[k] + 0·noise with x0 = x + 1 (and,
    for an ε ring, eps = x + 2) and a weight per slot: 5 steps over a ring of 3 slots (it wraps)
    give the Python host's result (step_loop) only if each x0 — each eps, for an ε ring — lands
    in slot step mod 3 — and, built with the sanitizers, without a read past the ring. No
    history_kind at all (graphs exported before it) is an x0 ring."""
    model_dir, out_dir = folders
    ring = "eps_history" if kind == "eps" else "x0_history"
    nodes = [_const("half", np.float32(0.5)), _const("zero", np.float32(0)), _const("one", np.float32(1)),
             _const("two", np.float32(2)),
             _const("w", np.array([0.3, -0.2, 0.1], np.float32).reshape(3, 1, 1, 1, 1)),
             _const("axis0", np.array([0], np.int64)),
             helper.make_node("Mul", [ring, "w"], ["weighed"]),
             helper.make_node("ReduceSum", ["weighed", "axis0"], ["past"], keepdims=0),
             helper.make_node("Mul", ["x", "half"], ["x_half"]),
             helper.make_node("Mul", ["noise", "zero"], ["z0"]),
             helper.make_node("Add", ["x_half", "past"], ["partial"]),
             helper.make_node("Add", ["partial", "z0"], ["x_prev"]),
             helper.make_node("Add", ["x", "one"], ["x0"])]
    outputs = [_tensor("x_prev"), _tensor("x0")]
    if kind == "eps":
        nodes.append(helper.make_node("Add", ["x", "two"], ["eps"]))
        outputs.append(_tensor("eps"))
    inputs = [_tensor("x"), _tensor("step", INT64, [1]), _tensor("noise"), _tensor(ring, shape=[3, *IMAGE])]
    graph = _graph(model_dir / "ring.onnx", nodes, inputs, outputs,
                   props=_props(num_steps=5, history=3, history_kind=kind))
    noise = torch.randn(6, 2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    write_noise_file(model_dir / "noise.f32", noise)
    done = sampler.run(*_argv(out_dir, graph, count=2, noise=model_dir / "noise.f32"))
    assert done.returncode == 0, done.stderr
    runner = OrtRunner(graph, threads=1)
    want = sample_with_step_graph(runner, noise, 3, kind or "x0").numpy()
    got = np.fromfile(out_dir / "x.f32", dtype="<f4").reshape(2, 3, 8, 8)
    assert np.abs(got - want).max() < 1e-5
    blind = sample_with_step_graph(lambda **kw: runner(**{**kw, ring: torch.zeros(3, 2, 3, 8, 8)}),
                                   noise, 3, kind or "x0").numpy()
    assert np.abs(blind - want).max() > 1e-2  # the ring's contents reach the result
    if kind == "eps":  # and they are the eps output, not x0
        wrong = sample_with_step_graph(lambda **kw: {**runner(**kw), "eps": runner(**kw)["x0"]},
                                       noise, 3, "eps").numpy()
        assert np.abs(wrong - want).max() > 1e-2


def test_metadata_json_is_read_whole(sampler, folders):
    """What json.dumps writes beyond the fields read — escapes, exponents, nesting, null — is
    valid and read past."""
    info = json.loads(_props()["fastddpm"])
    info["note"] = {"text": "caf\u00e9 \u4e2d \n \"q\" \t/\\", "eps": 1e-06, "big": -2.5e+30, "none": None,
                    "list": [[], {}, [True, False]]}
    model_dir, out_dir = folders
    model = _graph(model_dir / "g.onnx", props=_props(json_text=json.dumps(info, indent=2)))
    done = sampler.run(*_argv(out_dir, model))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("flags", [dict(count=1, seed="18446744073709551615", threads=0),
                                   dict(count="0007", seed="00", threads="1", raw_out=None)],
                         ids=["extremes", "leading_zeros"])
def test_edge_arguments_are_accepted(sampler, folders, flags):
    model_dir, out_dir = folders
    done = sampler.run(*_argv(out_dir, _graph(model_dir / "g.onnx"), **flags))
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("wrote ")


def test_help_is_usage_on_stdout(sampler):
    done = sampler.run("--help")
    assert done.returncode == 0 and not done.stderr
    assert done.stdout.startswith("usage: fastddpm_sample --model")


@pytest.mark.parametrize("case", GRAPHS, ids=list(GRAPHS))
def test_lying_graph_is_refused(sampler, folders, case):
    build, says = GRAPHS[case]
    model_dir, out_dir = folders
    _refused(sampler, out_dir, _argv(out_dir, build(model_dir)), says)


@pytest.mark.parametrize("case", METADATA, ids=list(METADATA))
def test_bad_metadata_is_refused(sampler, folders, case):
    flat, says = METADATA[case]
    model_dir, out_dir = folders
    _refused(sampler, out_dir, _argv(out_dir, _metadata_graph(model_dir, flat)), says)


@pytest.mark.parametrize("case", JSON, ids=list(JSON))
def test_bad_metadata_json_is_refused(sampler, folders, case):
    text, says = JSON[case]
    model_dir, out_dir = folders
    model = _graph(model_dir / "g.onnx", props=_props(json_text=text))
    _refused(sampler, out_dir, _argv(out_dir, model), says)


def test_a_real_export_with_bad_metadata_is_refused(sampler, step_graph, folders):  # noqa: F811
    """The exported graph itself (a U-Net inside), its num_steps changed to -1."""
    model_dir, out_dir = folders
    model = onnx.load(str(step_graph))
    for prop in model.metadata_props:
        if prop.key == "fastddpm.num_steps":
            prop.value = "-1"
    onnx.save(model, str(model_dir / "real.onnx"))
    _refused(sampler, out_dir, _argv(out_dir, model_dir / "real.onnx"), "not \"-1\"")


USAGE = "(fastddpm_sample --help for usage)"

# name → (flags replaced in the normal command line, extra tokens, what the error says)
ARGUMENTS = {
    "count_suffix": (dict(count="4x"), [], "--count must be an integer in 1..65536, not \"4x\""),
    "count_empty": (dict(count=""), [], "--count must be an integer in 1..65536, not \"\""),
    "count_negative": (dict(count="-1"), [], "not \"-1\""),
    "count_zero": (dict(count="0"), [], "not \"0\""),
    "count_plus": (dict(count="+4"), [], "not \"+4\""),
    "count_space": (dict(count=" 4"), [], "not \" 4\""),
    "count_float": (dict(count="4.0"), [], "not \"4.0\""),
    "count_too_many": (dict(count="65537"), [], "not \"65537\""),
    "count_overflow": (dict(count="99999999999999999999"), [], "not \"99999999999999999999\""),
    "seed_negative": (dict(seed="-1"), [], "--seed must be an integer in 0..18446744073709551615, not \"-1"),
    "seed_2_64": (dict(seed="18446744073709551616"), [], "not \"18446744073709551616\""),
    "seed_suffix": (dict(seed="7s"), [], "not \"7s\""),
    "threads_negative": (dict(threads="-1"), [], "--threads must be an integer in 0..1024"),
    "threads_word": (dict(threads="four"), [], "not \"four\""),
    "unknown_flag": ({}, ["--steps", "8"], "unknown argument \"--steps\""),
    "positional": ({}, ["extra.onnx"], "unknown argument \"extra.onnx\""),
    "missing_value_at_end": (dict(raw_out=None), ["--raw-out"], "--raw-out needs a value"),
    "flag_as_value": (dict(out=None), ["--out", "--threads", "1"], "--out needs a value"),
    "given_twice": ({}, ["--count", "2"], "--count is given twice"),
    "empty_out": (dict(out=""), [], "--out needs a file name"),
    "no_model": (dict(model=None), [], "--model is required"),
    "out_is_raw_out": (dict(raw_out="SAME"), [], "--out and --raw-out name the same file"),
}


@pytest.mark.parametrize("case", ARGUMENTS, ids=list(ARGUMENTS))
def test_bad_argument_is_refused(sampler, folders, case):
    flags, extra, says = ARGUMENTS[case]
    model_dir, out_dir = folders
    if flags.get("raw_out") == "SAME":
        flags = {**flags, "raw_out": out_dir / "grid.ppm"}
    line = _refused(sampler, out_dir, [*_argv(out_dir, _graph(model_dir / "g.onnx"), **flags), *extra], says)
    assert line.endswith(USAGE)


def _files(out_dir: Path) -> dict:
    (out_dir / "file").write_bytes(b"not a folder")
    (out_dir / "folder").mkdir()
    (out_dir / "noise.f32").write_bytes(b"\0" * 64)
    return {"under_a_file": out_dir / "file" / "grid.ppm", "folder": out_dir / "folder",
            "no_folder": out_dir / "missing" / "grid.ppm", "short_noise": out_dir / "noise.f32"}


# name → (flags, with paths from _files, what the error says)
FILES = {
    "out_under_a_file": (dict(out="under_a_file"), "cannot write"),
    "out_in_missing_folder": (dict(out="no_folder"), "cannot write"),
    "out_is_a_folder": (dict(out="folder"), "is a directory"),
    "raw_out_under_a_file": (dict(raw_out="under_a_file"), "cannot write"),
    "raw_out_is_a_folder": (dict(raw_out="folder"), "is a directory"),
    "model_missing": (dict(model="no_folder"), "--model"),
    "model_is_a_folder": (dict(model="folder"), "is not a regular file"),
    "model_is_not_onnx": (dict(model="short_noise"), "failed"),
    "noise_too_short": (dict(noise="short_noise"), "holds 16 floats; this graph and --count need 3840"),
    "noise_missing": (dict(noise="no_folder"), "--noise"),
    "noise_is_a_folder": (dict(noise="folder"), "is not a regular file"),
}


@pytest.mark.parametrize("case", FILES, ids=list(FILES))
def test_bad_file_is_refused(sampler, folders, case):
    flags, says = FILES[case]
    model_dir, out_dir = folders
    paths = _files(out_dir)
    argv = _argv(out_dir, _graph(model_dir / "g.onnx"), **{key: paths[value] for key, value in flags.items()})
    _refused(sampler, out_dir, argv, says)
