"""dfnet.accelerate: every inference path computes what DFNet.complete computes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from dfnet.accelerate import fold_batchnorm, optimize_for_inference
from dfnet.model import DFNet, build_model

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


def test_runner_without_options_is_the_eager_model(model, inputs, reference):
    runner = optimize_for_inference(model, channels_last=False, fold_bn=False)
    out = runner(*inputs)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)


def test_folded_runner_matches_and_copies(model, inputs, reference):
    before = snapshot(model)
    runner = optimize_for_inference(model, channels_last=False, fold_bn=True)
    assert runner.folded_batchnorms == 19
    assert count_batchnorms(runner.model) == 0
    assert runner.model is not model and count_batchnorms(model) == 19
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert (runner(*inputs) - reference).abs().max().item() < FOLD_TOLERANCE


def test_channels_last_matches_eager(model, inputs, reference):
    runner = optimize_for_inference(model, channels_last=True, fold_bn=False)
    weight = runner.model.encoder[1].conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()  # really NHWC, not a layout that happens to be both
    assert model.encoder[1].conv.weight.is_contiguous()  # the caller's weights keep theirs
    out = runner(*inputs)
    assert out.is_contiguous()
    assert (out - reference).abs().max().item() < 1e-5


def test_bf16_autocast_within_4_levels(model, inputs, reference):
    image, mask = inputs
    runner = optimize_for_inference(model, dtype=torch.bfloat16)
    out = runner(image, mask)
    assert out.dtype == torch.float32
    diff = (out - reference).abs().max().item()
    assert diff < 4 / 255
    assert diff > 0  # bf16 arithmetic actually ran (an fp32 run would match to ~1e-6 here)
    # Known pixels are pasted back from the float32 input, untouched by bf16 rounding.
    known = mask.expand_as(image).bool()
    assert torch.equal(out[known], image[known])


def test_float32_dtype_means_no_autocast(model, inputs, reference):
    runner = optimize_for_inference(model, dtype=torch.float32, fold_bn=False)
    assert runner.dtype is None
    assert (runner(*inputs) - reference).abs().max().item() < 1e-5


def test_rejects_unsupported_dtype(model):
    with pytest.raises(ValueError, match="dtype"):
        optimize_for_inference(model, dtype=torch.int8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_request_without_cuda_is_a_clear_error(model):
    with pytest.raises(RuntimeError, match="CUDA"):
        optimize_for_inference(model, device="cuda")


def test_bad_input_size_still_raises(model):
    runner = optimize_for_inference(model)
    with pytest.raises(ValueError, match="multiple"):
        runner(torch.rand(1, 3, 48, 48), torch.ones(1, 1, 48, 48))


def test_warmup_accepts_shapes(model):
    runner = optimize_for_inference(model)
    for shape in [(SIZE, SIZE), (2, SIZE, SIZE), (1, 3, SIZE, SIZE)]:
        assert runner.warmup(shape) >= 0.0
    with pytest.raises(ValueError, match="warmup shape"):
        runner.warmup((SIZE,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_cuda_paths(model, inputs, reference, dtype):
    runner = optimize_for_inference(model, device="cuda", dtype=dtype)
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
    runner = optimize_for_inference(model, compile=True)
    runner.warmup(inputs[0].shape)
    out = runner(*inputs)
    assert runner.compiled, "compilation fell back to eager on a machine with a C++ compiler"
    assert inductor_config.freezing == freezing_before  # freezing is switched on only per call
    assert (out - reference).abs().max().item() < 1e-4


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager(
    model, inputs, reference, tmp_path, monkeypatch, caplog
):
    # A real failure, not a simulated one: point inductor at a C++ compiler that does not exist,
    # with empty caches so no earlier build can be reused.
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    runner = optimize_for_inference(model, compile=True)
    image, mask = inputs[0][:1], inputs[1][:1]  # a shape no other test compiled
    with (
        inductor_config.patch(
            {"cpp.cxx": (str(tmp_path / "no-such-c++"),), "fx_graph_cache": False}
        ),
        caplog.at_level(logging.WARNING, logger="dfnet.accelerate"),
    ):
        out = runner(image, mask)
    assert not runner.compiled
    assert "falling back to eager" in caplog.text
    assert (out - reference[:1]).abs().max().item() < 1e-4
    torch._dynamo.reset()
