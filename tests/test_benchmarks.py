"""The delta benchmark measures what it claims: its Qwen2.5 geometries are DnD's layouts, and its batched and
per-adapter-loop variants compute the same Δ and the same gradients."""

import importlib.util
from dataclasses import replace

import pytest
import torch
from conftest import REPO_ROOT

from llgbm_ext.delta.functional import FunctionalLoRA
from llgbm_ext.lora.layout import NAMED_LAYOUTS


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_delta", REPO_ROOT / "benchmarks" / "delta.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-1.5b"])
def test_qwen_geometries_are_the_named_layouts(bench, name):
    _, _, layout = bench.geometry_config(name)
    assert replace(layout, name=name) == NAMED_LAYOUTS[name]
    _, _, shallow = bench.geometry_config(name, layers=2)
    assert shallow.num_layers == 2 and replace(shallow, num_layers=layout.num_layers) == layout


def test_batched_and_loop_give_the_same_delta_and_gradients(bench):
    torch.set_num_threads(1)
    model, layout = bench.build_model("tiny", layers=2)
    lora = FunctionalLoRA(model, layout)
    batch = bench.probe_batch(model.config.vocab_size, probes=2, device="cpu")
    factors = bench.make_factors(layout, 3, "cpu")
    out, grads = {}, {}
    for variant in bench.VARIANTS:
        out[variant] = bench.step(variant, lora, batch, factors)
        grads[variant] = [t.grad.clone() if t.grad is not None else None for ab in factors.values() for t in ab]
    assert out["batched"].shape == (3, layout.hidden_size)
    torch.testing.assert_close(out["batched"], out["loop"], rtol=1e-4, atol=1e-5)
    for g_batched, g_loop in zip(grads["batched"], grads["loop"]):
        torch.testing.assert_close(g_batched, g_loop, rtol=1e-3, atol=1e-6)
    assert all(g is None for g in grads["plain"])  # the plain model uses no adapter
    delta = out["batched"] - out["plain"][0]
    assert delta.norm() > 1e-3 * out["plain"].norm()  # the adapters change the activations
    assert bench.delta_cos(out["batched"], out["loop"], out["plain"][0]) == pytest.approx(1.0, abs=1e-5)
    assert bench.delta_cos(out["batched"], out["plain"], out["plain"][0]) == 0.0  # no Δ: the guard, not NaN


def test_scoring_benchmark_variants_agree(tiny_model):
    """benchmarks/scoring.py: shared-context scoring and its one-row-per-option reference give the same
    scores on one- and three-token options, with adapters."""
    spec = importlib.util.spec_from_file_location("bench_scoring", REPO_ROOT / "benchmarks" / "scoring.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, tokenizer = tiny_model
    layout = bench.get_layout("tiny")
    factors = bench.random_factors(layout, 2, generator=torch.Generator().manual_seed(0), std=0.05)
    adapters = bench.AdapterBatch(FunctionalLoRA(model, layout), factors)
    for task, option_tokens in (("word_colour", 1), ("digit_first_5", 3)):
        sequences, scored = bench.sequences_of(task, tokenizer, 6)
        assert set(scored) == {option_tokens}
        shared = bench.sequence_log_likelihoods(model, sequences, scored, 0, adapters)[0]
        torch.testing.assert_close(shared, bench.whole_rows(model, sequences, scored, 0, adapters), rtol=0, atol=1e-5)


def test_token_loss_benchmark_compares_equal_losses(monkeypatch, capsys):
    """benchmarks/token_loss.py: its plain reference is the loss ``TokenMSELoss`` fuses (it checks the bits
    before timing), and it reports a speedup and the memory kept for the backward by each."""
    spec = importlib.util.spec_from_file_location("bench_token_loss", REPO_ROOT / "benchmarks" / "token_loss.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    monkeypatch.setattr("sys.argv", ["token_loss.py", "--batch", "2", "--repeats", "1"])
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "bits equal" in out and "speedup=" in out
    assert float(out.split("saved_memory_ratio=")[1]) > 1.0  # the fused loss keeps only (pred − target)
