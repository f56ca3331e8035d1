"""Fuzzing the C++ sampler's step graphs (Hypothesis): ONNX graphs whose declared shapes, element
types, ranks, inputs, outputs and metadata vary, and whose computed outputs may differ from what
they declare, run by the built sampler (plain and, where the compiler has them, sanitized).

Each graph is the honest one of test_export_cpp_hostile (x_prev = x + 0·noise, x0 = x) at a drawn
count, channels, image size and step count, declared in any way that is still true (a dim
exact, symbolic, unknown or negative; inputs and outputs in any order) — and then given zero to
two faults drawn from a catalogue in which every fault alone makes the graph one the sampler
must refuse (a tensor missing or extra, another element type, an input of another rank or with
a wrong static dim — 0, 1, huge —, an output computed to another shape behind the declared one,
0 entries included, a NaN, metadata out of range). The promise: a graph without a fault runs,
exit 0, with a grid and a raw file of exactly its shape; a graph with one exits 2 with one line
on stderr, writes nothing, and (test_export_cpp.Sampler.run) raises no sanitizer report and dies
of no signal."""
import tempfile
from pathlib import Path

import numpy as np
from fuzzing import budget
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from test_export_cpp import pytestmark as pytestmark  # the same skip without cmake / ORT headers
from test_export_cpp import sampler  # noqa: F401  (the fixture: both builds)
from test_export_cpp_hostile import _argv, _const, _graph, _opaque, _props, _snapshot

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
IMAGES = ("x", "noise", "x_prev", "x0")  # the (N, C, H, W) tensors
OTHER_TYPES = [TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT32,
               TensorProto.UINT8, TensorProto.BOOL]
INPUTS = ("x", "noise", "step")
WRONG_DIMS = [0, 1, 2, 3, 7, 2**31, 2**40]  # each used only where it is not the true dim
FAULTS = ("missing", "extra", "type", "rank", "dim", "computed_shape", "nan", "metadata")


@st.composite
def _declared(draw, axis: int, true: int):
    """A true declaration of one dim: its value, a name (symbolic), nothing, or a negative
    number (ONNX Runtime reads both as unknown)."""
    return draw(st.sampled_from([true, f"d{axis}", f"dim{axis}", None, -2]))


@st.composite
def step_graphs(draw):
    """(graph builder over a folder, --count, image shape, the faults it was given)."""
    count, channels = draw(st.integers(1, 4)), draw(st.sampled_from([1, 3]))
    size, steps = draw(st.sampled_from([1, 2, 5, 8])), draw(st.integers(1, 3))
    true = [count, channels, size, size]
    shapes = {name: [draw(_declared(axis, dim)) for axis, dim in enumerate(true)] for name in IMAGES}
    shapes["step"] = [draw(st.sampled_from([1, "one", None]))]
    types = dict.fromkeys(IMAGES, FLOAT) | {"step": INT64}
    nodes = {"x_prev": [_const("zero", np.float32(0)), helper.make_node("Mul", ["noise", "zero"], ["z0"]),
                        helper.make_node("Add", ["x", "z0"], ["x_prev"])],
             "x0": [helper.make_node("Identity", ["x"], ["x0"])]}
    inputs, outputs, props = ["x", "step", "noise"], ["x_prev", "x0"], _props(steps, 0, channels, size)

    faults = [draw(st.sampled_from(FAULTS)) for _ in range(draw(st.sampled_from([1, 0, 1, 2])))]
    for fault in faults:
        name = draw(st.sampled_from([*IMAGES, "step"]))
        # a fault on a tensor an earlier fault removed or reshaped may change nothing: that
        # earlier fault makes the graph one to refuse all the same
        if fault == "missing":
            for names in (inputs, outputs):
                if name in names:
                    names.remove(name)
        elif fault == "extra":
            shapes["y"], types["y"] = list(true), FLOAT
            if draw(st.booleans()):
                inputs.append("y")
            else:
                nodes["y"] = [helper.make_node("Identity", ["x"], ["y"])]
                outputs.append("y")
        elif fault == "type":  # any but the true one (a second type fault must not restore it)
            true_type = INT64 if name == "step" else FLOAT
            types[name] = draw(st.sampled_from([t for t in [FLOAT, *OTHER_TYPES] if t != true_type]))
        # declared shapes lie on inputs only: where an output's declared shape conflicts with
        # what ONNX Runtime infers, it drops the declaration ("lenient merge") and the sampler
        # sees unknown dims; an output's real shape is what "computed_shape" lies about
        elif fault == "rank":  # one dim fewer or more (not back to the true rank), a scalar, no shape
            name = draw(st.sampled_from(INPUTS))
            dims, rank = shapes[name] or [], 1 if name == "step" else 4
            shapes[name] = draw(st.sampled_from([d for d in (dims[:-1], [*dims, 1], [], None)
                                                 if d is None or len(d) != rank]))
        elif fault == "dim" and shapes[name := draw(st.sampled_from(INPUTS))]:
            axis = draw(st.integers(0, len(shapes[name]) - 1))
            right = true[axis] if name in IMAGES and axis < 4 else 1  # step's one dim, a rank fault's
            shapes[name][axis] = draw(st.sampled_from([d for d in WRONG_DIMS if d != right]))
        elif fault == "computed_shape":
            out, axis = draw(st.sampled_from(["x_prev", "x0"])), draw(st.integers(0, 3))
            nodes[out] = _computed_other_shape(out, axis, true[axis], draw(st.booleans()))
        elif fault == "nan":
            nodes["x_prev"] = [_const("nan", np.float32(np.nan)),
                               helper.make_node("Add", ["x", "nan"], ["x_prev"])]
        elif fault == "metadata":
            props = _bad_metadata(draw, props, steps, channels, size)
        else:  # a "dim" fault on a tensor an earlier rank fault left without dims
            assert fault == "dim" and not shapes[name], (fault, shapes[name])

    inputs, outputs = draw(st.permutations(inputs)), draw(st.permutations(outputs))

    def build(folder: Path) -> Path:
        def declared(names):
            return [helper.make_tensor_value_info(n, types[n], shapes[n]) for n in names]

        graph_nodes = [node for name in ("x_prev", "x0", "y") for node in nodes.get(name, [])]
        return _graph(folder / "g.onnx", graph_nodes, declared(inputs), declared(outputs), props)

    return build, count, true, faults


def _bad_metadata(draw, props: dict, steps: int, channels: int, size: int) -> dict:
    """`props` with one thing wrong that the sampler must refuse."""
    kind = draw(st.sampled_from(["num_steps", "history", "channels", "graph", "missing"]))
    if kind == "num_steps":
        return {**props, "fastddpm.num_steps": draw(st.sampled_from(["0", "-1", "x", "", "100001", "2.0"]))}
    if kind == "history":  # 1, but the graph has no x0_history input
        return _props(steps, 1, channels, size)
    if kind == "channels":  # none a PGM/PPM grid can hold
        return _props(steps, 0, draw(st.sampled_from([0, 2, 4, 65])), size)
    if kind == "graph":
        return {**props, "fastddpm.graph": "eps"}
    dropped = draw(st.sampled_from(sorted(props)))
    return {key: value for key, value in props.items() if key != dropped}


def _computed_other_shape(out: str, axis: int, length: int, shrink: bool) -> list:
    """`out` = x cut to fewer entries (0 included) or doubled along `axis`, through a Slice whose
    bounds depend on `step`: shape inference cannot see it, only the sampler's check at run time."""
    if shrink:
        ends = np.full(4, 2**62, np.int64)
        ends[axis] = length - 1  # x[..., :length − 1, ...]: from length − 1 ≥ 0 entries
        cut = [_const(f"{out}_s", np.zeros(4, np.int64)), _const(f"{out}_e", ends),
               helper.make_node("Slice", ["x", f"{out}_s", f"{out}_e"], [f"{out}_c"])]
    else:
        cut = [helper.make_node("Concat", ["x", "x"], [f"{out}_c"], axis=axis)]
    return [*cut, *_opaque(f"{out}_c", out)]


def _grid_header(channels: int, count: int, size: int) -> bytes:
    """The PGM/PPM header of the sampler's grid (fastddpm.images.grid's layout: ceil(√N) images
    per row, 2 px padding)."""
    nrow = next(k for k in range(1, count + 1) if k * k >= count)
    width, height = nrow * (size + 2) + 2, -(-count // nrow) * (size + 2) + 2
    return b"%s\n%d %d\n255\n" % (b"P6" if channels == 3 else b"P5", width, height)


# a case is a process or two (plain, sanitized): no shrinking; the sampler's timeout guards hangs
@settings(budget(40), phases=[Phase.generate], deadline=None)
@given(case=step_graphs())
def test_step_graph_runs_only_when_it_tells_the_truth(sampler, case):  # noqa: F811
    build, count, (_, channels, size, _), faults = case
    event("faults: " + (", ".join(sorted(set(faults))) or "none"))  # --hypothesis-show-statistics
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, out_dir = Path(tmp) / "model", Path(tmp) / "out"
        model_dir.mkdir()
        out_dir.mkdir()
        argv = _argv(out_dir, build(model_dir), count=count)
        if faults:
            (out_dir / "grid.ppm").write_bytes(b"a previous run's grid")
            before = _snapshot(out_dir)
        done = sampler.run(*argv)
        if not faults:
            assert done.returncode == 0 and done.stderr.splitlines()[-1].startswith("wrote "), done.stderr
            assert (out_dir / "grid.ppm").read_bytes().startswith(_grid_header(channels, count, size))
            raw = np.fromfile(out_dir / "x.f32", dtype="<f4")
            assert raw.size == count * channels * size * size and np.isfinite(raw).all()
            assert sorted(p.name for p in out_dir.iterdir()) == ["grid.ppm", "x.f32"]
            return
        assert done.returncode == 2, (faults, done.returncode, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastddpm_sample: error: "), (faults, done.stderr)
        assert _snapshot(out_dir) == before, faults  # no output, no temp file, the old grid kept
