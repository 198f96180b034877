"""Losses: hand-computed values, gradients (and their absence through detached sides), errors, no input
mutation, DnD's criterion, the low-rank ΔW identity and gauge invariance."""

import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO_ROOT, requires_dnd
from llgbm_ext.errors import LLGBMError
from llgbm_ext.lora.factors import random_factors
from llgbm_ext.lora.layout import NAMED_LAYOUTS, TINY, get_layout
from llgbm_ext.lora.tokens import tokenize
from llgbm_ext.losses import (
    DeltaGuidedLoss,
    DeltaHead,
    DeltaLoss,
    DeltaOnlyLoss,
    DeltaWLoss,
    LossError,
    MultiTaskLoss,
    TokenMSELoss,
    WeightLoss,
    lowrank_sq_distance,
)

NAN = float("nan")


def same(x, y):
    return torch.equal(torch.isnan(x), torch.isnan(y)) and torch.equal(x.nan_to_num(), y.nan_to_num())


# --- tokens: DnD's criterion ---------------------------------------------------------------------

def hand_tokens():
    # (B=1, N=2, H=1, W=3); one NaN in the target, so 5 masked entries.
    pred = torch.tensor([[[[1.0, 2.0, 3.0]], [[0.0, 0.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0, NAN]], [[1.0, 1.0, 1.0]]]])
    return pred, target


def test_token_mse_by_hand():
    pred, target = hand_tokens()
    # squared errors: token 0 -> 0, 4 (NaN skipped); token 1 -> 1, 1, 1
    assert TokenMSELoss()(pred, target)["loss"].item() == pytest.approx(7 / 5)
    # weights (1, 2): 0 + 4 + 2·(1 + 1 + 1) = 10 over 5 entries
    assert TokenMSELoss(torch.tensor([1.0, 2.0]))(pred, target)["loss"].item() == pytest.approx(2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_token_mse_equals_the_plain_autograd_expression(dtype, weighted):
    """The fused loss gives the bits of ``where(~isnan(t), p − t, 0).square() · w`` / count, and its gradient."""
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(3, 5, 4, 6, generator=gen).to(dtype)
    target[:, :, 3:, 2:] = NAN
    pred = torch.randn(3, 5, 4, 6, generator=gen).to(dtype).requires_grad_()
    weight = torch.rand(5, generator=gen) * 3 if weighted else None
    compute = torch.promote_types(dtype, torch.float32)
    mask = ~torch.isnan(target)
    squares = torch.where(mask, pred.to(compute) - target.to(compute), 0.0).square()
    plain = (squares * weight.to(compute)[:, None, None] if weighted else squares).sum() / mask.sum()
    (plain_grad,) = torch.autograd.grad(plain, pred)
    fused = TokenMSELoss(weight)(pred, target)["loss"]
    (fused_grad,) = torch.autograd.grad(fused, pred)
    assert fused.dtype == plain.dtype and torch.equal(fused, plain)
    assert fused_grad.dtype == dtype and torch.equal(fused_grad, plain_grad)
    assert fused_grad[~mask].eq(0).all() and fused_grad[mask].ne(0).all()


def test_token_mse_gradient_masked_and_inputs_untouched():
    pred, target = hand_tokens()
    pred = pred.requires_grad_()
    pred0, target0 = pred.detach().clone(), target.clone()
    TokenMSELoss(torch.tensor([1.0, 2.0]))(pred, target)["loss"].backward()
    # d/dp of w·(p − t)²/5 = 2·w·(p − t)/5; the NaN target entry gets exactly 0
    expected = torch.tensor([[[[0.0, 0.8, 0.0]], [[-0.8, -0.8, -0.8]]]])
    torch.testing.assert_close(pred.grad, expected)
    assert same(pred.detach(), pred0) and same(target, target0)


def test_token_mse_errors():
    pred, target = hand_tokens()
    with pytest.raises(LossError, match="criterion_weight has 3 entries"):
        TokenMSELoss(torch.ones(3))(pred, target)
    with pytest.raises(LossError, match=r"shape \(N,\)"):
        TokenMSELoss(torch.ones(1, 2, 1, 1))
    with pytest.raises(LossError, match="same shape"):
        TokenMSELoss()(pred, target[..., :2])


@requires_dnd
def test_token_mse_equals_dnd_criterion():
    sys.path.insert(0, str(REPO_ROOT / "dnd_repo"))
    from workspace.dnd.model.decoderonly import HyperConvDecoderModel

    pred = torch.randn(3, 7, 6, 10)
    target = torch.randn(3, 7, 6, 10)
    target[torch.rand_like(target) < 0.15] = NAN
    weight = torch.rand(7) * 2
    ours = TokenMSELoss(weight)(pred, target)["loss"]
    # DnD's loop: mask = ~isnan(tokens); nan_to_num_; criterion (which overwrites its inputs: give it copies)
    dnd_self = SimpleNamespace(criterion_weight=weight.view(1, -1, 1, 1), return_individual_loss=False)
    theirs = HyperConvDecoderModel.criterion(dnd_self, pred.clone(), target.nan_to_num(0.0), ~torch.isnan(target))
    assert abs(ours.item() - theirs.item()) <= 1e-6


# --- factors: raw A/B MSE and ΔW MSE ---------------------------------------------------------------

def hand_factors():
    # one layer, rank 1, in = out = 2. ΔW_pred = B·A = [[3, 6], [4, 8]], ΔW_target = [[3, 0], [3, 0]]
    pred = {"q_proj": (torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0], [4.0]]]))}
    target = {"q_proj": (torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[3.0], [3.0]]]))}
    return pred, target


def test_weight_loss_by_hand_and_gradient():
    pred, target = hand_factors()
    a, b = (x.requires_grad_() for x in pred["q_proj"])
    out = WeightLoss()(pred, target)
    # A errors 0, 2 -> 4; B errors 0, 1 -> 1; 4 elements
    assert out["loss"].item() == pytest.approx(5 / 4)
    out["loss"].backward()
    torch.testing.assert_close(a.grad, torch.tensor([[[0.0, 1.0]]]))  # 2·(p − t)/4
    torch.testing.assert_close(b.grad, torch.tensor([[[0.0], [0.5]]]))


def test_weight_loss_rank_mismatch_is_an_error_not_zero():
    with pytest.raises(LossError, match="q_proj lora_A"):  # rank 8 vs rank 16
        WeightLoss()(random_factors(TINY, 2), random_factors(get_layout("tiny", rank=16), 2))
    pred, target = hand_factors()
    with pytest.raises(LLGBMError, match="projections"):
        WeightLoss()(pred, {"k_proj": target["q_proj"]})


def test_delta_w_loss_by_hand():
    pred, target = hand_factors()
    # ΔW_pred − ΔW_target = [[0, 6], [1, 8]]: 0 + 36 + 1 + 64 = 101 over 4 elements
    assert DeltaWLoss()(pred, target)["loss"].item() == pytest.approx(101 / 4)
    # scalings 2 and 1: 2·[[3, 6], [4, 8]] − [[3, 0], [3, 0]] = [[3, 12], [5, 16]] -> 9 + 144 + 25 + 256
    assert DeltaWLoss(scaling=2.0, teacher_scaling=1.0)(pred, target)["loss"].item() == pytest.approx(434 / 4)


def test_lowrank_distance_equals_dense_with_different_ranks():
    g = torch.Generator().manual_seed(1)
    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    a1, b1 = randn(2, 3, 4, 20), randn(2, 3, 12, 4)  # 2 adapters, 3 layers, rank 4, out 12, in 20
    a2, b2 = randn(2, 3, 8, 20), randn(2, 3, 12, 8)  # rank 8
    dense = (0.5 * b1 @ a1 - 2.0 * b2 @ a2).square().sum(dim=(-2, -1))
    torch.testing.assert_close(lowrank_sq_distance(a1, b1, a2, b2, 0.5, 2.0), dense, rtol=1e-12, atol=1e-12)

    leaves = [x.clone().requires_grad_() for x in (a1, b1, a2, b2)]
    pred, target = {"q_proj": (leaves[0], leaves[1])}, {"q_proj": (leaves[2], leaves[3])}
    loss = DeltaWLoss(scaling=0.5, teacher_scaling=2.0)(pred, target)["loss"]
    torch.testing.assert_close(loss, dense.sum() / (2 * 3 * 12 * 20), rtol=1e-12, atol=0)
    grads = torch.autograd.grad(loss, leaves)
    dense_leaves = [x.clone().requires_grad_() for x in (a1, b1, a2, b2)]
    la1, lb1, la2, lb2 = dense_leaves
    dense_loss = (0.5 * lb1 @ la1 - 2.0 * lb2 @ la2).square().mean()
    for ours, theirs in zip(grads, torch.autograd.grad(dense_loss, dense_leaves)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_delta_w_loss_never_forms_dense_matrix():
    pred = {"down_proj": (torch.randn(2, 8, 600, requires_grad=True), torch.randn(2, 400, 8, requires_grad=True))}
    target = {"down_proj": (torch.randn(2, 16, 600), torch.randn(2, 400, 16))}
    with MaxNumel() as mode:
        DeltaWLoss()(pred, target)["loss"].backward()
    assert mode.max_numel <= 2 * 16 * 600  # the largest factor; one dense ΔW alone would be 400 * 600


def test_gauge_invariance():
    g = torch.Generator().manual_seed(2)
    pred, target = random_factors(TINY, 2, generator=g, std=0.1), random_factors(TINY, 2, generator=g, std=0.1)
    r = TINY.rank
    transformed = {}
    for proj, (a, b) in pred.items():
        q, _ = torch.linalg.qr(torch.randn(*a.shape[:-2], r, r, generator=g))
        rot = q * torch.linspace(0.5, 2.0, r)  # invertible, non-orthogonal: A -> R·A, B -> B·R⁻¹
        transformed[proj] = (rot @ a, b @ torch.linalg.inv(rot))
    delta_w = DeltaWLoss(TINY.scaling)
    before, after = delta_w(pred, target)["loss"].item(), delta_w(transformed, target)["loss"].item()
    assert after == pytest.approx(before, rel=1e-5)
    raw_before, raw_after = WeightLoss()(pred, target)["loss"].item(), WeightLoss()(transformed, target)["loss"].item()
    assert abs(raw_after - raw_before) > 0.1 * raw_before


def test_delta_w_loss_errors():
    pred, target = hand_factors()
    a, b = target["q_proj"]
    with pytest.raises(LossError, match="q_proj predicted ΔW stack"):
        DeltaWLoss()(pred, {"q_proj": (torch.cat([a, a], dim=-1), b)})  # in = 4 vs 2
    with pytest.raises(LossError, match="target q_proj lora_A"):
        DeltaWLoss()(pred, {"q_proj": (a, b.expand(1, 2, 2))})  # rank of B != rank of A
    with pytest.raises(LossError, match="q_proj predicted ΔW stack"):
        DeltaWLoss()(pred, {"q_proj": (a.expand(3, 1, 2), b.expand(3, 2, 1))})  # 3 layers vs 1


# --- deltas ----------------------------------------------------------------------------------------

def hand_deltas():
    # row 0: |p| = 10, |t| = 5, p·t = 32 -> cos = 0.64, ‖p − t‖² = 36 + 16 + 9 = 61
    # row 1: same direction, |p| = 1, |t| = 2 -> cos = 1, ‖p − t‖² = 1
    return torch.tensor([[6.0, 8.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 3.0], [2.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("nmse", (0.72 + 0.0) / 2),  # 2 − 2·cos
        ("cosine", (0.36 + 0.0) / 2),  # 1 − cos
        ("mse", (61 / 25 + 1 / 4) / 2),  # ‖p − t‖² / ‖t‖²
    ],
)
def test_delta_losses_by_hand(kind, expected):
    pred, target = hand_deltas()
    out = DeltaLoss(kind)(pred, target)
    assert out["loss"].item() == pytest.approx(expected)
    assert out["cos"].item() == pytest.approx((0.64 + 1.0) / 2)
    assert out["norm_ratio"].item() == pytest.approx((2.0 + 0.5) / 2)


@pytest.mark.parametrize("kind", ["nmse", "cosine", "mse"])
def test_delta_losses_do_not_scale_with_hidden_size(kind):
    pred, target = torch.randn(4, 64), torch.randn(4, 64)
    # same geometry at H = 512; LLGBM's mse_loss(normalize(p), normalize(t)) would shrink 8-fold here
    wide = DeltaLoss(kind)(pred.repeat(1, 8), target.repeat(1, 8))["loss"]
    assert wide.item() == pytest.approx(DeltaLoss(kind)(pred, target)["loss"].item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["nmse", "cosine", "mse"])
def test_delta_losses_safe_for_zero_vectors(kind):
    for pred, target in [(torch.zeros(2, 5), torch.randn(2, 5)), (torch.randn(2, 5), torch.zeros(2, 5))]:
        pred = pred.requires_grad_()
        loss = DeltaLoss(kind)(pred, target)["loss"]
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_delta_loss_errors():
    with pytest.raises(LossError, match=r"predicted delta \(2, 3\) and teacher delta \(2, 4\)"):
        DeltaLoss()(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(LossError, match="kind"):
        DeltaLoss("l1")


# --- combined --------------------------------------------------------------------------------------

def test_multitask_by_hand_and_components():
    tokens_pred, tokens_target = hand_tokens()
    delta_pred, delta_teacher = hand_deltas()
    tokens_pred.requires_grad_()
    delta_pred.requires_grad_()
    loss = MultiTaskLoss(TokenMSELoss(torch.tensor([1.0, 2.0])), lambda_weight=1.0, lambda_delta=0.5)
    out = loss(
        weight_pred=tokens_pred, weight_target=tokens_target, delta_pred=delta_pred, delta_teacher=delta_teacher
    )
    assert out["loss"].item() == pytest.approx(2.0 + 0.5 * 0.36)
    assert out["loss/weight"].item() == pytest.approx(2.0) and out["loss/delta"].item() == pytest.approx(0.36)
    assert out["cos/delta"].item() == pytest.approx(0.82)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert tokens_pred.grad.abs().sum() > 0 and delta_pred.grad.abs().sum() > 0


def test_multitask_weight_only_and_monitoring():
    pred, target = hand_factors()
    weight_only = MultiTaskLoss(WeightLoss(), lambda_weight=1.0, lambda_delta=0.0)
    out = weight_only(weight_pred=pred, weight_target=target)
    assert set(out) == {"loss", "loss/weight"} and out["loss"].item() == pytest.approx(5 / 4)
    # λ_delta = 0 but deltas given: logged, no gradient
    delta_pred, delta_teacher = hand_deltas()
    delta_pred.requires_grad_()
    out = weight_only(weight_pred=pred, weight_target=target, delta_pred=delta_pred, delta_teacher=delta_teacher)
    assert out["loss/delta"].item() == pytest.approx(0.36) and out["loss"].item() == pytest.approx(5 / 4)
    assert delta_pred.grad is None and not out["loss/delta"].requires_grad

    with pytest.raises(LossError, match="lambda_delta = 0.1 > 0"):
        MultiTaskLoss(WeightLoss())(weight_pred=pred, weight_target=target)
    with pytest.raises(LossError, match="needs a weight_loss"):
        MultiTaskLoss(None, lambda_weight=1.0)
    with pytest.raises(LossError, match="lambda_weight must be"):
        MultiTaskLoss(WeightLoss(), lambda_weight=-1.0)


def test_multitask_with_delta_w_loss():
    pred, target = hand_factors()
    delta_pred, delta_teacher = hand_deltas()
    out = MultiTaskLoss(DeltaWLoss(), lambda_weight=0.1, lambda_delta=1.0, delta_kind="cosine")(
        weight_pred=pred, weight_target=target, delta_pred=delta_pred, delta_teacher=delta_teacher
    )
    assert out["loss"].item() == pytest.approx(0.1 * 101 / 4 + 0.18)


def test_delta_only_loss():
    pred, target = hand_deltas()
    out = DeltaOnlyLoss("mse")(pred, target)
    assert set(out) == {"loss", "loss/delta", "cos/delta", "norm_ratio/delta"}
    assert out["loss"].item() == pytest.approx((61 / 25 + 1 / 4) / 2)


def test_delta_guided_by_hand():
    head, teacher = hand_deltas()
    computed = teacher.clone()  # a perfect computed delta: L(computed, teacher) = 0, L(head, computed) = 0.36
    loss = DeltaGuidedLoss(lambda_pred=1.0, lambda_computed=2.0, lambda_consistency=0.5, kind="nmse")
    out = loss(head, teacher)
    assert set(out) == {"loss", "loss/pred", "cos/pred", "norm_ratio/pred"}
    assert out["loss"].item() == pytest.approx(0.36)
    out = loss(head, teacher, computed)
    assert out["loss/computed"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss/consistency"].item() == pytest.approx(0.36)
    assert out["loss"].item() == pytest.approx(0.36 + 0.5 * 0.36)


def test_delta_guided_consistency_trains_head_not_computed():
    teacher = torch.randn(3, 16)
    head, computed = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    consistency_only = DeltaGuidedLoss(lambda_pred=0.0, lambda_computed=0.0, lambda_consistency=1.0)
    consistency_only(head, teacher, computed)["loss"].backward()
    assert computed.grad is None  # the computed side is detached (LLGBM detached the head instead)
    (expected,) = torch.autograd.grad(DeltaLoss()(head, computed.detach())["loss"], head)
    torch.testing.assert_close(head.grad, expected)

    # with λ_computed the computed delta gets exactly the gradient of λc·L(computed, teacher)
    head.grad = None
    DeltaGuidedLoss(1.0, 2.0, 1.0)(head, teacher, computed)["loss"].backward()
    (expected,) = torch.autograd.grad(2.0 * DeltaLoss()(computed, teacher)["loss"], computed)
    torch.testing.assert_close(computed.grad, expected)

    with pytest.raises(LossError, match="nothing to train"):
        consistency_only(head, teacher)


# --- delta head ------------------------------------------------------------------------------------

def test_delta_head_shapes_and_size():
    layout = NAMED_LAYOUTS["qwen2.5-0.5b"]
    head = DeltaHead(layout)
    n, (h, w) = layout.num_tokens, layout.token_size
    params = sum(p.numel() for p in head.parameters())
    assert params == h * w * 128 + 128 + n * 128 + 2 * 128 + 128 * 512 + 512 + 512 * 896 + 896
    assert params < 1e-3 * n * h * w * layout.hidden_size
    assert head(torch.randn(2, n, h, w)).shape == (2, layout.hidden_size)
    with pytest.raises(LossError, match="expected"):
        head(torch.randn(2, n - 1, h, w))


def test_delta_head_reads_token_positions_and_nan_cells():
    head = DeltaHead(TINY)
    tokens = tokenize(random_factors(TINY, 2), TINY)
    permuted = tokens[:, torch.randperm(TINY.num_tokens)]
    # which layer/projection a token belongs to matters (without positions: only rounding, ~1e-7)
    assert (head(tokens) - head(permuted)).abs().max() > 1e-3 * head(tokens).abs().max()
    tokens[:, :, 0, 0] = NAN  # unused cells of larger token sizes are NaN
    assert torch.isfinite(head(tokens)).all()


@pytest.mark.parametrize("backprop", [False, True])
def test_delta_head_gradient_to_generator_is_a_flag(backprop):
    head = DeltaHead(TINY, dim=16, mlp_dim=32, backprop_to_generator=backprop)
    generated = torch.randn(2, TINY.num_tokens, *TINY.token_size, requires_grad=True)  # the generator's output
    teacher, computed = torch.randn(2, TINY.hidden_size), torch.randn(2, TINY.hidden_size)
    DeltaGuidedLoss()(head(generated), teacher, computed)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert (generated.grad is not None) == backprop
