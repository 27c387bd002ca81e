"""dfnet.accelerate: every inference path computes what DFNet.complete computes."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dfnet import accelerate
from dfnet.accelerate import (
    INFERENCE_PATHS,
    InferencePath,
    choose_path,
    default_calibration,
    fold_batchnorm,
    native_bfloat16,
    native_int8,
    optimize_for_inference,
    persistent_compile_cache,
)
from dfnet.fast_decoder import FastDecoderBlock, subpixel_kernels, use_fast_decoders
from dfnet.model import Conv2dSame, DecoderBlock, DFNet, build_model
from dfnet.onnx import onnxruntime_available

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # the small preset's size multiple
FOLD_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model() -> DFNet:
    """Small DFNet whose BatchNorms are far from the identity (stats and affine parameters), so
    dropping a BN or folding it wrongly changes the output."""
    torch.manual_seed(0)
    net = build_model("small")
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.3, 3.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, SIZE, SIZE, generator=generator)
    mask = (torch.rand(2, 1, SIZE, SIZE, generator=generator) > 0.4).float()
    mask[:, :, 16:48, 8:40] = 0.0  # plus one large hole
    return image, mask


@pytest.fixture(scope="module")
def reference(model: DFNet, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model.complete(*inputs)


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def count_batchnorms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_fixture_batchnorms_matter(model, inputs, reference):
    # Guards the tests below: with BN removed outright the output must move a lot, otherwise
    # "folded output equals eager output" would prove nothing.
    stripped = copy.deepcopy(model)
    for module in stripped.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.Identity())
    assert (stripped.complete(*inputs) - reference).abs().max() > 100 * FOLD_TOLERANCE


def test_fold_batchnorm_matches_eager_and_leaves_model_alone(model, inputs, reference):
    before = snapshot(model)
    model.train()  # the fold must use running stats regardless of the caller's mode ...
    try:
        folded = fold_batchnorm(model)
        assert model.training  # ... and must not flip the caller's flag
    finally:
        model.eval()
    assert count_batchnorms(folded) == 0
    # small preset: 5 encoder + 6 decoder BNs, and 2 per BlendBlock × 4 fusion levels
    assert count_batchnorms(model) == 5 + 6 + 2 * 4
    after = snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The folded conv weights really differ from the original ones (folding was not skipped).
    assert not torch.equal(folded.encoder[1].conv.weight, model.encoder[1].conv.weight)
    assert (folded.complete(*inputs) - reference).abs().max().item() < FOLD_TOLERANCE
    # All scales, not only the pasted finest one: the coarse fusion blocks are folded too.
    with torch.no_grad():
        ours, theirs = folded(*inputs), model(*inputs)
    for a, b in zip(ours.results + ours.alphas, theirs.results + theirs.alphas, strict=True):
        assert (a - b).abs().max().item() < FOLD_TOLERANCE


PLAIN = InferencePath("plain", channels_last=False, fold_bn=False)


def test_plain_path_is_the_eager_model(model, inputs, reference):
    runner = optimize_for_inference(model, path=PLAIN)
    out = runner(*inputs)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def bench():
    """bench/inference.py, imported as a module."""
    spec = importlib.util.spec_from_file_location("bench_inference", ROOT / "bench" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))  # the script imports bench/_common.py
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def test_eager_changes_keep_the_numbers(bench):
    """Convs with a symmetric "same" pad let nn.Conv2d pad, and the fast decoder blocks run their
    upsampled half at low resolution; bench/inference.py's `before` path (explicit F.pad
    everywhere, upsample then cat then conv) computes the same function at both presets, to
    float32 rounding (the sub-pixel kernels sum the 3×3 taps in another order)."""
    for preset in ("small", "official"):
        torch.manual_seed(0)
        net = build_model(preset).eval()
        before = bench.as_before(net)
        convs = [m for m in net.modules() if isinstance(m, Conv2dSame)]
        assert any(m.same_pad is None and m.padding != (0, 0) for m in convs)  # nn.Conv2d pads these
        assert all(m.same_pad is not None for m in before.modules() if isinstance(m, Conv2dSame))
        use_fast_decoders(net, transposed=False)
        use_fast_decoders(before, transposed=False)  # leaves the baseline's own decoder blocks alone
        assert all(type(m) is FastDecoderBlock for m in net.decoder)
        assert all(type(m) is bench.TwoPassDecoderBlock for m in before.decoder)
        size = net.config.size_multiple
        image, mask = torch.rand(1, 3, size, size), (torch.rand(1, 1, size, size) > 0.3).float()
        with torch.no_grad():
            ours, old = net(image, mask), before(image, mask)
        for a, b in zip(ours.results + ours.alphas, old.results + old.alphas, strict=True):
            assert (a - b).abs().max().item() <= 2.5e-7  # two float32 ulps at 1.0


def test_goal_lines_bound_the_speed_up_by_the_prefill(bench):
    """OpenCV's pre-fill runs eagerly on every path, so the goal lines say how far the auto path's
    network went and how far any path could go: eager fp32 time over pre-fill time."""
    fp32 = {"model": "shipped", "size": 512, "batch": 1, "path": "fp32", "auto": False, "ms": 100.0,
            "ratio": 1.0, "ratio_before": None, "prefill_ms": 25.0}  # fmt: skip
    auto = {**fp32, "path": "compile-bf16", "auto": True, "ms": 40.0, "ratio": 2.5, "l1_rel": 0.0, "bpe_rel": 0.0}
    lines = bench.goal_lines([fp32, auto])
    assert any("auto path `compile-bf16`" in line and "2.50× today's eager fp32 (NOT met)" in line for line in lines)
    (prefill,) = [line for line in lines if "pre-fill" in line]
    assert "25.0 ms" in prefill and "network alone: 5.00×" in prefill  # (100 - 25) / (40 - 25)
    assert "no path can pass 4.00×" in prefill  # 100 / 25


@pytest.mark.parametrize("transposed", [False, True], ids=["subpixel", "transposed"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_decoder_block_is_upsample_cat_conv(channels_last, transposed):
    """Both fast forms (sub-pixel phases, one transposed conv) compute the paper's upsample →
    concat → 3×3 conv of the block they are built from (and its gradients, to the inputs and the
    checkpoint-layout weights), in the input's memory format."""
    torch.manual_seed(0)
    block = DecoderBlock(5, 2, 3).double().eval()
    nn.init.normal_(block.norm.running_mean)
    fast = FastDecoderBlock(block, transposed)
    assert fast.state_dict().keys() == block.state_dict().keys()  # the checkpoint layout, shared
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    ours = fast(x.contiguous(memory_format=layout), skip.contiguous(memory_format=layout))
    upsampled = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    reference = block.act(block.norm(block.conv(torch.cat([upsampled, skip], dim=1))))
    assert torch.allclose(ours, reference, atol=1e-12, rtol=0)
    assert ours.is_contiguous(memory_format=layout)
    weights = torch.randn_like(reference)
    wrt = (x, skip, block.conv.weight, block.conv.bias)
    ours_grads = torch.autograd.grad((ours * weights).sum(), wrt)
    for a, b in zip(ours_grads, torch.autograd.grad((reference * weights).sum(), wrt), strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_subpixel_kernels_reproduce_a_3x3_conv_of_the_upsample():
    """Each output phase (a, b) of conv3x3(up(x)) is phase kernel (a, b) at offset (a, b)."""
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64)
    full = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0), weight, padding=1)
    phases = torch.nn.functional.conv2d(x, subpixel_kernels(weight), padding=1)
    for k, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        assert torch.allclose(full[:, :, a::2, b::2], phases[:, 4 * k : 4 * k + 4, a : a + 5, b : b + 6], atol=1e-12)


def test_eager_path_folds_uses_channels_last_and_copies(model, inputs, reference):
    before = snapshot(model)
    runner = optimize_for_inference(model, path="eager")
    assert runner.path.name == "eager" and not runner.compiled
    assert count_batchnorms(runner.model) == 0
    assert runner.model is not model and count_batchnorms(model) == 19
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    weight = runner.model.encoder[1].conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert model.encoder[1].conv.weight.is_contiguous()  # the caller's weights keep their layout
    out = runner(*inputs)
    assert out.is_contiguous()
    assert all(type(block) is FastDecoderBlock for block in runner.model.decoder)
    assert not any(block.transposed for block in runner.model.decoder)  # eager: the phase form is faster
    assert (out - reference).abs().max().item() < FOLD_TOLERANCE


@pytest.mark.parametrize("native", [True, False])
def test_transposed_decoders_only_on_the_compiled_paths_they_speed_up(model, monkeypatch, native):
    """fp32 and native-bf16 compiled paths run transposed decoders; emulated bf16 does not (oneDNN's
    transposed conv is pathological there), nor does the eager path. Nothing compiles here."""
    import dfnet.accelerate

    monkeypatch.setattr(dfnet.accelerate, "native_bfloat16", lambda device: native)
    paths = ("eager", "compile", "compile-bf16")
    decoders = {path: optimize_for_inference(model, path=path).model.decoder for path in paths}
    assert not any(block.transposed for block in decoders["eager"])
    assert all(block.transposed for block in decoders["compile"])
    assert all(block.transposed == native for block in decoders["compile-bf16"])


def test_bf16_autocast_within_4_levels(model, inputs, reference):
    image, mask = inputs
    runner = optimize_for_inference(model, path=InferencePath("bf16-eager", dtype=torch.bfloat16))
    out = runner(image, mask)
    assert out.dtype == torch.float32
    diff = (out - reference).abs().max().item()
    assert diff < 4 / 255
    assert diff > 0  # bf16 arithmetic actually ran (an fp32 run would match to ~1e-6 here)
    # Known pixels are pasted back from the float32 input, untouched by bf16 rounding.
    known = mask.expand_as(image).bool()
    assert torch.equal(out[known], image[known])


def test_unknown_path_is_a_clear_error(model):
    with pytest.raises(ValueError, match="unknown inference path 'fast'"):
        optimize_for_inference(model, path="fast")


def test_auto_chooses_from_the_machine(model, monkeypatch):
    cpu = torch.device("cpu")
    path, reason = choose_path("cpu")
    if native_bfloat16(cpu):
        assert path is INFERENCE_PATHS["compile-bf16"] and "native bf16" in reason
    elif native_int8() and onnxruntime_available():  # AVX-512 VNNI without bf16
        assert path is INFERENCE_PATHS["onnxruntime-int8"] and "no native bf16" in reason
    else:
        assert path is INFERENCE_PATHS["int8"] and "no native bf16" in reason
    # The same CPU capped to AVX2 (what a Zen 3 runs): no native bf16 and no VNNI for torch, so
    # int8 (torchao is installed).
    capped = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    check = "from dfnet.accelerate import choose_path; p, r = choose_path('cpu'); print(p.name, r, sep='|')"
    out = subprocess.run([sys.executable, "-c", check], env=capped, capture_output=True, text=True, check=True)
    name, reason = out.stdout.strip().rsplit("\n", 1)[-1].split("|")
    assert name == "int8" and "no native bf16" in reason
    # Inductor needs a C++ compiler on the CPU: without one, auto stays eager (a real lookup) ...
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    if path.runtime == "onnxruntime":  # ... unless it runs ONNX Runtime, which compiles nothing
        assert choose_path("cpu")[0] is path
        monkeypatch.setattr(accelerate, "onnxruntime_available", lambda: False)  # as without dfnet[onnx]
    path, reason = choose_path("cpu")
    assert path.name == "eager" and "C++ compiler" in reason
    runner = optimize_for_inference(model)
    assert runner.path.name == "eager" and not runner.compiled


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_request_without_cuda_is_a_clear_error(model):
    with pytest.raises(RuntimeError, match="CUDA"):
        optimize_for_inference(model, device="cuda")


def test_bad_input_size_still_raises(model):
    runner = optimize_for_inference(model, path="eager")
    with pytest.raises(ValueError, match="multiple"):
        runner(torch.rand(1, 3, 48, 48), torch.ones(1, 1, 48, 48))


def test_warmup_accepts_shapes(model):
    runner = optimize_for_inference(model, path="eager")
    for shape in [(SIZE, SIZE), (2, SIZE, SIZE), (1, 3, SIZE, SIZE)]:
        assert runner.warmup(shape) >= 0.0
    with pytest.raises(ValueError, match="warmup shape"):
        runner.warmup((SIZE,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_cuda_paths(model, inputs, reference, dtype):
    runner = optimize_for_inference(model, device="cuda", path=InferencePath("cuda", dtype=dtype))
    out = runner(*inputs)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    # fp32 on CUDA may use TF32 convolutions (10-bit mantissa, cuDNN's default): not 1e-5.
    tolerance = 1 / 255 if dtype is None else 4 / 255
    assert (out.cpu() - reference).abs().max().item() < tolerance


@pytest.mark.slow
def test_compiled_runner_matches_eager(model, inputs, reference):
    import torch._inductor.config as inductor_config

    freezing_before = inductor_config.freezing
    torch._dynamo.reset()
    runner = optimize_for_inference(model, path="compile")
    runner.warmup(inputs[0].shape)
    out = runner(*inputs)
    assert runner.compiled, "compilation fell back to eager on a machine with a C++ compiler"
    assert all(block.transposed for block in runner.model.decoder)
    assert all(type(block) is DecoderBlock for block in model.decoder)  # the caller's model is left alone
    # A new batch recompiles with a dynamic batch (as Serve's warm-up does); the 1×1 bottleneck
    # once made that recompile fail its stride checks and fall back to eager.
    runner.warmup((2, SIZE, SIZE))
    assert runner.compiled, "recompiling for batch 2 fell back to eager"
    assert inductor_config.freezing == freezing_before  # freezing is switched on only per call
    assert (out - reference).abs().max().item() < 1e-4


def test_every_image_size_gets_a_static_graph(model, monkeypatch):
    """A new image size gets a graph of its own, with static sizes: by default dynamo would make
    height and width symbolic at the second size, and such a graph ran 8-11x slower than a static
    one on the CPU (accelerate._static_sizes). Dynamo itself runs; the graphs it hands over are
    recorded and run as they are instead of going through inductor."""
    symbolic = []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        values = [n.meta.get("example_value") for n in graph.graph.nodes if n.op == "placeholder"]
        sizes = [d for v in values if isinstance(v, torch.Tensor) for d in v.shape[2:]]
        symbolic.append(any(isinstance(x, torch.SymInt) for x in values + sizes))  # sizes can be inputs too
        return graph.forward

    compile_with = torch.compile
    monkeypatch.setattr(torch, "compile", lambda network, **_: compile_with(network, backend=recording_backend))
    torch._dynamo.reset()
    runner = optimize_for_inference(model, path="compile")
    for side in (SIZE, 2 * SIZE, 3 * SIZE):
        runner.warmup((2, side, side))
    assert runner.compiled
    assert symbolic == [False, False, False]  # three sizes, three static graphs
    torch._dynamo.reset()


def test_a_size_compiles_on_its_nth_call_and_warmup_compiles_at_once(model, inputs, reference, compiled_graphs):
    """compile_after=2: a size's first image runs eagerly, its second compiles it.
    compile_after=None (Serve after its warm-up): sizes not warmed up never compile."""
    graphs = compiled_graphs
    runner = optimize_for_inference(model, path="compile", compile_after=2)
    image, mask = inputs[0][:1], inputs[1][:1]
    first = runner(image, mask)
    assert graphs == [] and runner.graph_sizes == set()
    second = runner(image, mask)
    assert len(graphs) == 1 and runner.graph_sizes == {(SIZE, SIZE)}
    for out in (first, second):  # eager and compiled compute the same completion
        assert (out - reference[:1]).abs().max().item() < 1e-4

    runner.compile_after = None
    bigger = torch.nn.functional.interpolate(image, scale_factor=2.0), torch.ones(1, 1, 2 * SIZE, 2 * SIZE)
    bigger[1][..., :SIZE, :SIZE] = 0.0
    for _ in range(3):
        runner(*bigger)
    assert len(graphs) == 1 and runner.graph_sizes == {(SIZE, SIZE)}
    runner(image, mask)  # a size with a graph keeps using it
    assert len(graphs) == 1
    runner.warmup(bigger[0].shape)
    assert len(graphs) == 2 and runner.graph_sizes == {(SIZE, SIZE), (2 * SIZE, 2 * SIZE)}


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager(model, inputs, reference, tmp_path, monkeypatch, caplog):
    # A real failure, not a simulated one: point inductor at a C++ compiler that does not exist,
    # with empty caches so no earlier build can be reused.
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    runner = optimize_for_inference(model, path="compile")
    image, mask = inputs[0][:1], inputs[1][:1]  # a shape no other test compiled
    with (
        inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-c++"),), "fx_graph_cache": False}),
        caplog.at_level(logging.WARNING, logger="dfnet.accelerate"),
    ):
        out = runner(image, mask)
    assert not runner.compiled
    assert "falling back to eager" in caplog.text
    assert (out - reference[:1]).abs().max().item() < 1e-4
    assert (runner(image, mask) - out).abs().max().item() == 0  # and stays eager afterwards
    torch._dynamo.reset()


@pytest.mark.slow
def test_int8_paths_quantise_every_conv_and_stay_close_on_photos(tmp_path, monkeypatch):
    """The shipped model on the int8 paths, calibrated by default on the bundled photos, completes a
    photo: every convolution the graph keeps runs on quantised input and weights, and the
    completion stays within a few levels of fp32's; int8-bf16 really runs bf16 between them."""
    from PIL import Image

    from dfnet.data import sample_photos
    from dfnet.masks import evaluation_masks

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    model = DFNet.from_pretrained("pretrained")
    path = sorted(sample_photos().values())[-1]  # default_calibration takes the first ones
    photo = Image.open(path).convert("RGB").resize((128, 128))
    image = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)[None].float() / 255
    mask = torch.from_numpy(evaluation_masks(1, 128, 128, seed=0)[3]).float()[:, None]
    reference = model.complete(image, mask)
    hole = mask.expand_as(reference) == 0
    outputs = {}
    for name in ("int8", "int8-bf16"):
        runner = optimize_for_inference(model, path=name)
        compiled = runner._network._orig_mod  # what torch.compile wraps
        graph = next(m for m in compiled.modules() if isinstance(m, torch.fx.GraphModule)).graph  # the quantised one
        convs = [node for node in graph.nodes if node.target == torch.ops.aten.conv2d.default]
        assert len(convs) >= model.config.levels * 2  # every encoder and decoder conv at least
        for conv in convs:
            data, weight = conv.args[:2]
            assert data.target == torch.ops.quantized_decomposed.dequantize_per_tensor.default, conv.name
            assert weight.target == torch.ops.quantized_decomposed.dequantize_per_channel.default, conv.name
        outputs[name] = runner(image, mask)
        assert outputs[name].dtype == torch.float32 and runner.compiled
        assert 0 < (outputs[name] - reference)[hole].abs().mean().item() < 2 / 255
    assert not torch.equal(outputs["int8"], outputs["int8-bf16"])  # the same int8 graph, bf16 in between


def test_default_calibration_is_photos_with_holes():
    pairs = default_calibration(size=64, count=3)
    assert len(pairs) == 3
    for image, mask in pairs:
        assert image.shape == (1, 3, 64, 64) and mask.shape == (1, 1, 64, 64)
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.05  # a photo, not flat
        assert set(mask.unique().tolist()) == {0.0, 1.0}
    holes = [1 - mask.mean().item() for _, mask in pairs]
    assert len(set(holes)) == 3  # one hole-size bin each


def test_int8_range_follows_the_cpu_and_its_isa_cap():
    """Full 8-bit activations only where oneDNN has VNNI: not on this CPU capped to AVX2."""
    check = "import torch; from dfnet.accelerate import native_int8; print(native_int8())"
    native = torch.cpu._is_vnni_supported() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert native_int8() == native
    capped = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", check], env=capped, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_compile_cache_survives_restarts_unless_the_user_chose_one(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache_dir()  # inductor writes its own default (under /tmp) into the environment
    assert persistent_compile_cache() == tmp_path / "dfnet" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "dfnet" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert persistent_compile_cache() == tmp_path / "mine"  # the user's choice stands
