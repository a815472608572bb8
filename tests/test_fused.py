"""loralab.fused: bit-identical to PyTorch's ops (the dropouts given the same masks), and it
really keeps less for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loralab import fused
from loralab.config import build_config
from loralab.models import load_tokenizer
from loralab.tasks import get_task
from loralab.train import build_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_autograd_bit_for_bit(dtype):
    torch.manual_seed(0)
    gate = torch.randn(4, 7, 32, dtype=dtype, requires_grad=True)
    up = torch.randn(4, 7, 32, dtype=dtype, requires_grad=True)
    grad = torch.randn(4, 7, 32, dtype=dtype)
    ref = nn.functional.silu(gate) * up
    ref_grads = torch.autograd.grad(ref, (gate, up), grad)
    out = fused.SiluMul.apply(gate, up)
    grads = torch.autograd.grad(out, (gate, up), grad)
    assert torch.equal(out, ref)
    for mine, theirs in zip(grads, ref_grads, strict=True):
        assert torch.equal(mine, theirs)


def test_silu_mul_computes_only_the_gradients_asked_for():
    gate = torch.randn(3, 8, requires_grad=True)
    up = torch.randn(3, 8)  # e.g. a frozen branch
    fused.SiluMul.apply(gate, up).sum().backward()
    assert gate.grad is not None and up.grad is None


class _KeepMaskDropout(nn.Module):
    """PyTorch's dropout arithmetic (`x * noise`, noise = mask / keep in x's dtype) on masks
    drawn by `fused.keep_mask`: the unfused reference for the fused dropouts."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        mask, keep = fused.keep_mask(x, self.p)
        return x * mask.to(x.dtype).div_(keep)


def _keep_mask_dropouts(model: nn.Module) -> None:
    """Swap every `nn.Dropout` with p > 0 for the reference above."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout and child.p > 0:
                setattr(module, name, _KeepMaskDropout(child.p))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5])
def test_keep_mask_drops_with_probability_p_from_the_seeded_generator(p):
    like = torch.empty(1001, 999, dtype=torch.bfloat16)  # an odd count: a partly used last draw
    torch.manual_seed(7)
    mask, keep = fused.keep_mask(like, p)
    assert mask.dtype == torch.bool and mask.shape == like.shape
    assert keep == 1 - round(p * 2**16) / 2**16
    assert abs(keep - (1 - p)) < 2**-16
    n = mask.numel()
    sd = (keep * (1 - keep) / n) ** 0.5
    assert abs(mask.float().mean().item() - keep) < 5 * sd  # ~1e6 draws: 5 sd is ~0.2 points
    # Every 16-bit lane of the 64-bit draws is used alike (a lane stuck near one end, such as
    # the sign lane of a non-negative draw, would drop nearly all or none of its elements).
    flat = mask.flatten()[: n - n % 4].view(-1, 4).float().mean(0)
    assert (flat - keep).abs().max() < 5 * sd * 2
    torch.manual_seed(7)
    assert torch.equal(fused.keep_mask(like, p)[0], mask)  # the seed decides the draws
    assert not torch.equal(fused.keep_mask(like, p)[0], mask)  # and the next draw differs


def test_keep_mask_rounds_extreme_probabilities_into_range():
    like = torch.empty(4096)
    assert fused.keep_mask(like, 1e-7)[0].all()  # rounds to 0: keeps everything
    mask, keep = fused.keep_mask(like, 0.999999)  # never rounds to "drop all": keep > 0
    assert keep == 2**-16 and mask.float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5])
def test_mask_dropout_draws_and_scales_like_nn_dropout(p, dtype):
    x = torch.randn(64, 48, dtype=dtype, requires_grad=True)
    grad = torch.randn(64, 48, dtype=dtype)
    torch.manual_seed(3)
    ref = _KeepMaskDropout(p)(x)
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    torch.manual_seed(3)
    out = fused.MaskDropout(p)(x)
    (out_grad,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(out, ref) and torch.equal(out_grad, ref_grad)
    assert 0 < (out == 0).float().mean() < 1  # it did drop something, and not everything


def test_mask_dropout_is_the_identity_in_eval():
    drop = fused.MaskDropout(0.5).eval()
    x = torch.randn(5, 6)
    assert drop(x) is x


def _lora_layer(adapters=("default",), dropout=0.1, **kw):
    """A PEFT LoRA Linear (16 -> 12, r = 4) with fp32 factors on a bf16 base, and a copy."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12)).to(torch.bfloat16)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"], **kw)
    model = get_peft_model(base, cfg, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            nn.init.normal_(p)  # B starts at zero: give both factors a gradient to compare
    plain = copy.deepcopy(model)
    _keep_mask_dropouts(plain)
    return model, plain


def _forward_backward(model, x, grad, autocast: bool):
    """Output, every gradient (x's too) and the global generator state after one step."""
    x = x.detach().requires_grad_()
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.backward(grad)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, {"x": x.grad, **grads}, torch.get_rng_state()


@pytest.mark.parametrize("tokens", [(3, 5), (9, 301)])  # the vector kernels' tails, and 43k
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("p", [0.05, 0.3])
def test_lora_dropout_recomputed_in_backward_matches_peft_bit_for_bit(p, autocast, tokens):
    """Against PEFT's own LoRA forward, its dropout drawing the same masks."""
    model, plain = _lora_layer(dropout=p)
    assert fused.compact_dropouts(model) == 1
    layer = model.base_model.model[0]
    assert isinstance(layer.lora_dropout["default"], nn.Identity)
    assert layer.cast_input_dtype_enabled is False  # the fused A casts x itself
    x = (torch.randn(*tokens, 16) * 100).to(torch.bfloat16)  # wide exponents: rounding shows
    grad = torch.randn(*tokens, 12).to(torch.bfloat16)
    out, grads, rng = _forward_backward(model.train(), x, grad, autocast)
    ref, ref_grads, ref_rng = _forward_backward(plain.train(), x, grad, autocast)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert grads.keys() == ref_grads.keys() and len(grads) == 3  # x, A, B
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name
    assert torch.equal(rng, ref_rng)  # the same draws from the global stream, no more
    with torch.no_grad():  # eval: no dropout, the same numbers as PEFT's
        assert torch.equal(model.eval()(x), plain.eval()(x))
        assert not torch.equal(model.eval()(x), out)  # and training did drop


def test_lora_dropout_keeps_the_shared_input_once():
    """Two adapted projections of one input (a layer's q and v) keep that input once, in its
    own dtype, and a 1-byte mask each: no noise, no dropped-out copies."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.ModuleDict({"q": nn.Linear(16, 16), "v": nn.Linear(16, 16)}).to(torch.bfloat16)

    def run(fuse: bool) -> int:
        model = get_peft_model(
            _TwoProj(base), LoraConfig(r=4, lora_dropout=0.2, target_modules=["q", "v"])
        )
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if fuse:
            assert fused.compact_dropouts(model) == 2
        x = torch.randn(64, 16).to(torch.bfloat16).requires_grad_()
        seen: dict[int, int] = {}

        def pack(t):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x).sum()
        out.backward()  # outside the hooks: what the backward pass recomputes is not kept
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        # [64, 16] tensors and their masks; not A's [64, 4] output or the weights' bf16 casts
        return sum(n for ptr, n in seen.items() if ptr not in weights and n >= 64 * 16)

    # PyTorch: per adapter, the fp32 noise and the bf16 dropped-out input of A.
    assert run(False) == 2 * (64 * 16 * 4 + 64 * 16 * 2)
    assert run(True) == 64 * 16 * 2 + 2 * 64 * 16  # fused: x once, a 1-byte mask per adapter


class _TwoProj(nn.Module):
    def __init__(self, base: nn.ModuleDict):
        super().__init__()
        self.q, self.v = base["q"], base["v"]

    def forward(self, x):
        return self.q(x) + self.v(x)


def test_adapters_the_fusion_cannot_take_keep_their_dropout_and_peft_cast():
    # DoRA uses the dropped-out x itself: a 1-byte-mask dropout, PEFT's own cast.
    dora, _ = _lora_layer(use_dora=True)
    assert fused.compact_dropouts(dora) == 1
    layer = dora.base_model.model[0]
    assert type(layer.lora_dropout["default"]) is fused.MaskDropout
    assert layer.cast_input_dtype_enabled is True
    # A second adapter without dropout is not fused: PEFT must still cast x for it.
    two, _ = _lora_layer(adapters=("default", "other"))
    layer = two.base_model.model[0]
    layer.lora_dropout["other"] = nn.Identity()
    assert fused.compact_dropouts(two) == 1
    assert layer.cast_input_dtype_enabled is True
    assert fused.compact_dropouts(two) == 0  # a second pass changes nothing


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward pass."""
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()  # outside the hooks: what the backward pass recomputes is not kept
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def _step(monkeypatch, enabled: bool, method: str):
    monkeypatch.setenv(fused.ENV, "1" if enabled else "0")
    cfg = build_config(
        overrides=["model.name=tiny-llama", f"train.method={method}", "train.precision=fp32",
                   "lora.dropout=0.3"]
    )  # fmt: skip
    tok = load_tokenizer(cfg.model.name)
    torch.manual_seed(0)
    built = build_model(cfg, get_task("sst2"), tok, progress=False)
    model = built.model.train()
    if not enabled:  # the same masks as the fused dropouts draw
        _keep_mask_dropouts(model)
    batch = {
        "input_ids": torch.randint(3, 200, (4, 24)),
        "attention_mask": torch.ones(4, 24, dtype=torch.long),
        "labels": torch.tensor([0, 1, 1, 0]),
    }
    torch.manual_seed(1)  # the dropout draws
    saved = _saved_bytes(model, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return built, saved, grads


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_step_is_unchanged_and_keeps_less(monkeypatch, method):
    built, saved, grads = _step(monkeypatch, True, method)
    plain, plain_saved, plain_grads = _step(monkeypatch, False, method)
    layers = built.model.config.num_hidden_layers
    assert built.fused["gated_mlps"] == layers
    assert built.fused["dropouts"] == (2 * layers if method == "lora" else 0)  # q and v
    assert plain.fused == {}
    assert grads.keys() == plain_grads.keys() and grads
    for name, g in grads.items():
        assert torch.equal(g, plain_grads[name]), name
    # One [batch, length, intermediate] tensor less per layer. Under LoRA, PyTorch keeps each
    # adapter's dropped-out input and, from the second layer on (the first layer's input needs
    # no gradient: the embeddings are frozen), its noise; fused, a layer keeps the one input
    # its query and value adapters share and each adapter a 1-byte mask. All [batch, length,
    # hidden], 4 bytes per element in fp32.
    cfg = built.model.config
    tokens = 4 * 24
    less = layers * tokens * cfg.intermediate_size * 4
    if method == "lora":
        kept_by_torch = (2 * layers + 2 * (layers - 1)) * 4
        less += (kept_by_torch - layers * 4 - 2 * layers) * tokens * cfg.hidden_size
    assert plain_saved - saved == less


class _ScaledMLP(nn.Module):
    """Llama's attribute names and activation, but a forward that scales: must keep its own."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
        self.down_proj, self.act_fn = nn.Linear(16, 8), nn.SiLU()

    def forward(self, x):
        return 0.5 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _PlainMLP(_ScaledMLP):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_only_mlps_that_compute_the_gated_form_are_fused():
    model = nn.Sequential(_ScaledMLP(), _PlainMLP())
    state = torch.random.get_rng_state()
    assert fused.fuse_gated_mlps(model) == 1
    assert torch.equal(torch.random.get_rng_state(), state)  # the check drew nothing globally
    assert "forward" not in vars(model[0]) and "forward" in vars(model[1])
    x = torch.randn(2, 8)
    assert torch.equal(model[1](x), _PlainMLP.forward(model[1], x))


@pytest.mark.parametrize(
    "family, fused_expected",
    # Gemma: GELU. Seed-OSS: a residual dropout inside its MLP that fires in training only
    # (it was fused: the check compared in eval mode, and the dropout was lost).
    [("llama", True), ("mistral", True), ("qwen2", True), ("gemma", False), ("seed_oss", False)],
)
def test_families_in_transformers(family, fused_expected):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    n = fused.fuse_gated_mlps(model)
    assert n == (2 if fused_expected else 0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
