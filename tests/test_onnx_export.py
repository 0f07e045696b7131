"""ONNX export of the prompt side (prompt encoder + mask decoder with the adapter) and torch.compile of the decoder.

The export tests need the `onnx` extra (onnx, onnxscript, onnxruntime) and skip cleanly without it; the
torch.compile test needs only torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from pasam_hf import PASamModel, PASamProcessor
from pasam_hf.cli import main
from pasam_hf.onnx_export import OUTPUT_NAMES, example_decoder_inputs, export_decoder_onnx


def nontrivial_model() -> PASamModel:
    """The tiny model with weights ten times SAM's init scale: masks, IoUs and mined points then depend clearly on
    the inputs (at the default scale every logit is ~1e-4, where a 1e-4 comparison would prove nothing)."""
    config = tiny_config()
    config.initializer_range = 0.2
    torch.manual_seed(0)
    return PASamModel(config).eval()


def torch_outputs(model: PASamModel, inputs: dict) -> list[np.ndarray]:
    with torch.inference_mode():
        outputs = model(multimask_output=False, **inputs)
    return [getattr(outputs, name).numpy() for name in OUTPUT_NAMES]


def assert_close(onnx_outputs: list[np.ndarray], expected: list[np.ndarray]) -> None:
    for name, got, want in zip(OUTPUT_NAMES, onnx_outputs, expected):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.fixture(scope="module")
def onnxruntime():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def box_export(onnxruntime, tmp_path_factory):
    """A saved tiny model and its box-prompt export, made by `pasam export-onnx ... --check`."""
    root = tmp_path_factory.mktemp("onnx")
    model = nontrivial_model()
    model.save_pretrained(root / "model")
    PASamProcessor.from_model_config(model.config).save_pretrained(root / "model")
    out = root / "decoder.onnx"
    code = main(["export-onnx", "--model", str(root / "model"), "--out", str(out), "--check"])
    return model, out, code


def test_cli_exports_one_file_that_matches(box_export, capsys):
    model, out, code = box_export
    assert code == 0
    assert out.is_file() and out.stat().st_size > 0
    # Weights inside the graph file: nothing else is written beside it.
    assert sorted(path.name for path in out.parent.iterdir()) == ["decoder.onnx", "model"]


def test_box_export_matches_pytorch_for_any_batch_and_prompt_count(box_export, onnxruntime):
    model, out, _ = box_export
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_inputs()] == ["image_embeddings", "adapter_pixel_values", "input_boxes"]
    assert [node.name for node in session.get_outputs()] == list(OUTPUT_NAMES)
    # Sizes other than the export's example (2 images, 3 prompts), the size-1 edge cases included.
    for batch_size, num_prompts, seed in ((2, 3, 1), (1, 1, 2), (3, 5, 3)):
        inputs = example_decoder_inputs(model, "boxes", batch_size=batch_size, num_prompts=num_prompts, seed=seed)
        expected = torch_outputs(model, inputs)
        got = session.run(list(OUTPUT_NAMES), {name: value.numpy() for name, value in inputs.items()})
        assert_close(got, expected)
        assert got[0].shape == (batch_size, num_prompts, 1, 32, 32)
        assert got[2].shape == (batch_size, num_prompts, 1, 8, 8)
        assert 0.0 <= got[2].min() and got[2].max() <= 1.0
        # Not a constant graph: the masks follow the prompts.
        assert np.abs(got[0]).max() > 1e-2
        if num_prompts > 1:
            assert not np.allclose(got[0][:, 0], got[0][:, 1])


# A second export: half a minute on a loaded CPU, so out of the default run.
@pytest.mark.heavy
def test_point_export_with_a_static_prompt_count(onnxruntime, tmp_path):
    model = nontrivial_model()
    model.train()
    path = export_decoder_onnx(model, tmp_path / "points.onnx", prompt="points", num_prompts_dynamic=False,
                               num_prompts=2)
    assert model.training  # the caller's mode is restored
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {node.name: node.shape for node in session.get_inputs()}
    assert list(shapes) == ["image_embeddings", "adapter_pixel_values", "input_points", "input_labels"]
    assert shapes["input_points"][1] == 2 and isinstance(shapes["input_points"][0], str)
    model.eval()
    # The batch and the points per prompt stay dynamic.
    for batch_size, num_points, seed in ((1, 1, 4), (3, 4, 5)):
        inputs = example_decoder_inputs(model, "points", batch_size=batch_size, num_prompts=2, num_points=num_points,
                                        seed=seed)
        got = session.run(list(OUTPUT_NAMES), {name: value.numpy() for name, value in inputs.items()})
        assert_close(got, torch_outputs(model, inputs))
    wrong = example_decoder_inputs(model, "points", batch_size=1, num_prompts=3)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(list(OUTPUT_NAMES), {name: value.numpy() for name, value in wrong.items()})


def test_export_rejects_bad_requests(tmp_path):
    model = nontrivial_model()
    with pytest.raises(ValueError, match="prompt='masks' is not supported"):
        export_decoder_onnx(model, tmp_path / "x.onnx", prompt="masks")
    with pytest.raises(ValueError, match="is a directory"):
        export_decoder_onnx(model, tmp_path)
    with pytest.raises(ValueError, match="takes a PASamModel"):
        export_decoder_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["export-onnx", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "x.onnx")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("pasam export-onnx: error:") and "does not exist" in error


@pytest.mark.parametrize("training", [False, True], ids=["eval-top-k", "train-gumbel"])
def test_decoder_forward_compiles_without_graph_breaks(training):
    """`fullgraph=True` makes any graph break an error: the forward from image embeddings (prompt encoder, decoder,
    adapter with top-k or Gumbel top-k mining, loss) is one graph. The "eager" backend keeps this to seconds."""
    model = nontrivial_model().train(training)
    inputs = example_decoder_inputs(model, "boxes", batch_size=2, num_prompts=2)
    labels = torch.zeros(2, 2, 128, 128, dtype=torch.uint8)
    labels[..., 32:96, 40:100] = 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.manual_seed(0)
    outputs = compiled(multimask_output=False, labels=labels, **inputs)
    torch.manual_seed(0)
    reference = model(multimask_output=False, labels=labels, **inputs)
    torch.testing.assert_close(outputs.pred_masks, reference.pred_masks)
    torch.testing.assert_close(outputs.loss, reference.loss)
    if training:
        outputs.loss.backward()
        assert model.mask_decoder.prompt_adapter.refined_mlp.proj_out.weight.grad is not None
    torch._dynamo.reset()


def test_sam_sized_decoder_export_with_the_factored_attention(onnxruntime, tmp_path):
    """At SAM's decoder sizes (C 256, 64 x 64 image tokens) the factored attention forms run in PyTorch; the
    export keeps the prompt count dynamic (no guard on it from the choice of form) and matches PyTorch."""
    from pasam_hf import PASamConfig
    from pasam_hf.modeling_pasam import PASamAttention

    config = PASamConfig()
    config.vision_config.num_hidden_layers = 1  # the image encoder is not exported
    config.initializer_range = 0.05  # logits O(1): larger scales make mined points flip on rounding
    torch.manual_seed(0)
    model = PASamModel(config).eval()
    forms = []
    for module in model.modules():
        if isinstance(module, PASamAttention):
            original = module._cheapest_form
            module._cheapest_form = lambda *shapes, original=original: forms.append(original(*shapes)) or forms[-1]
    path = export_decoder_onnx(model, tmp_path / "decoder.onnx", prompt="boxes")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch_size, num_prompts, seed in ((1, 1, 1), (2, 5, 2)):
        forms.clear()
        inputs = example_decoder_inputs(model, "boxes", batch_size=batch_size, num_prompts=num_prompts, seed=seed)
        expected = torch_outputs(model, inputs)
        assert {"token_queries", "token_keys"} & set(forms)
        got = session.run(list(OUTPUT_NAMES), {name: value.numpy() for name, value in inputs.items()})
        assert_close(got, expected)
        assert got[0].shape == (batch_size, num_prompts, 1, 256, 256)
