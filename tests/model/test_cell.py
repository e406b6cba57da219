"""The gated cell: explicit cell_step == fused kernel == torch.nn.LSTM, the gate trace obeys the notation,
and state is passed in and returned, never kept."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from model import lm as lm_module
from model.cell import GATE_ORDER, GateActivations, LSTMLayer, dropout_mask
from model.config import LSTMConfig
from model.lm import GateTrace, LSTMLanguageModel, LSTMState

# float32 is what the model trains and serves in: the bar there is 1e-5 on these small shapes.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
PROPERTY = settings(max_examples=30, deadline=None)


def make_layers(num_layers: int, input_size: int, hidden_size: int, seed: int, dtype: torch.dtype) -> list[LSTMLayer]:
    torch.manual_seed(seed)
    sizes = [input_size] + [hidden_size] * num_layers
    layers = [LSTMLayer(sizes[k], sizes[k + 1]).to(dtype).eval() for k in range(num_layers)]
    with torch.no_grad():  # a random (not constant) forget bias, so every gate block is exercised alike
        for layer in layers:
            layer.bias.uniform_(-0.5, 1.0)
    return layers


def random_inputs(
    batch: int, steps: int, input_size: int, num_layers: int, hidden_size: int, seed: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, T, I) and a non-zero initial (h, C), each (L, B, H)."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, steps, input_size, generator=gen, dtype=dtype) * 1.5
    h0 = torch.rand(num_layers, batch, hidden_size, generator=gen, dtype=dtype) * 1.8 - 0.9  # |h| < 1, like a real h
    c0 = torch.randn(num_layers, batch, hidden_size, generator=gen, dtype=dtype) * 2.0
    return x, h0, c0


def run_stack(
    layers: list[LSTMLayer], x: Tensor, h0: Tensor, c0: Tensor, explicit: bool
) -> tuple[Tensor, Tensor, Tensor]:
    hs, cs = [], []
    for k, layer in enumerate(layers):
        if explicit:
            x, h, c, steps = layer.forward_explicit(x, h0[k], c0[k])
            assert len(steps) == x.shape[1]
            assert all(isinstance(s, GateActivations) for s in steps)
        else:
            x, h, c = layer(x, h0[k], c0[k])
        hs.append(h)
        cs.append(c)
    return x, torch.stack(hs), torch.stack(cs)


def torch_lstm_copy(layers: list[LSTMLayer], swap: tuple[int, int] | None = None) -> nn.LSTM:
    """nn.LSTM holding the same parameters (optionally with two gate blocks swapped, to break it)."""
    first = layers[0]
    lstm = nn.LSTM(
        first.input_size, first.hidden_size, num_layers=len(layers), batch_first=True, dtype=first.weight.dtype
    )
    hidden = first.hidden_size
    with torch.no_grad():
        for k, layer in enumerate(layers):
            w_ih, w_hh, b = layer.input_weight.clone(), layer.recurrent_weight.clone(), layer.bias.clone()
            if swap is not None:
                order = list(range(4))
                order[swap[0]], order[swap[1]] = order[swap[1]], order[swap[0]]
                rows = torch.cat([torch.arange(g * hidden, (g + 1) * hidden) for g in order])
                w_ih, w_hh, b = w_ih[rows], w_hh[rows], b[rows]
            getattr(lstm, f"weight_ih_l{k}").copy_(w_ih)
            getattr(lstm, f"weight_hh_l{k}").copy_(w_hh)
            getattr(lstm, f"bias_ih_l{k}").copy_(b)
            getattr(lstm, f"bias_hh_l{k}").zero_()
    return lstm.eval()


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@PROPERTY
@given(
    num_layers=st.integers(1, 3),
    batch=st.integers(1, 4),
    steps=st.integers(1, 12),
    input_size=st.integers(1, 9),
    hidden_size=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
@example(num_layers=3, batch=4, steps=12, input_size=7, hidden_size=9, seed=0, dtype=torch.float32)
@example(num_layers=2, batch=3, steps=1, input_size=1, hidden_size=1, seed=1, dtype=torch.float32)
@torch.no_grad()
def test_explicit_fused_and_torch_lstm_agree(
    num_layers: int, batch: int, steps: int, input_size: int, hidden_size: int, seed: int, dtype: torch.dtype
) -> None:
    layers = make_layers(num_layers, input_size, hidden_size, seed, dtype)
    x, h0, c0 = random_inputs(batch, steps, input_size, num_layers, hidden_size, seed, dtype)
    explicit = run_stack(layers, x, h0, c0, explicit=True)
    fused = run_stack(layers, x, h0, c0, explicit=False)
    out_ref, (h_ref, c_ref) = torch_lstm_copy(layers)(x, (h0, c0))
    reference = (out_ref, h_ref, c_ref)
    tol = TOLERANCE[dtype]
    for name, got, fast, want in zip(("outputs", "h_T", "C_T"), explicit, fused, reference, strict=True):
        assert got.dtype == dtype
        assert max_diff(got, want) <= tol, f"explicit vs nn.LSTM {name}"
        assert max_diff(fast, want) <= tol, f"fused vs nn.LSTM {name}"
        assert max_diff(got, fast) <= tol, f"explicit vs fused {name}"
    # outputs are the top layer's h_t, and the last one is the carried h_T
    assert torch.equal(explicit[0][:, -1], explicit[1][-1])
    assert torch.equal(fused[0][:, -1], fused[1][-1])


@torch.no_grad()
def test_the_parity_bar_is_meaningful() -> None:
    """At these scales a wrong gate order or a dropped initial state misses the 1e-5 bar by orders of magnitude."""
    layers = make_layers(2, 5, 6, seed=11, dtype=torch.float32)
    x, h0, c0 = random_inputs(3, 8, 5, 2, 6, seed=11, dtype=torch.float32)
    fused = run_stack(layers, x, h0, c0, explicit=False)
    for swap in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        out_bad, _ = torch_lstm_copy(layers, swap=swap)(x, (h0, c0))
        assert max_diff(fused[0], out_bad) > 1e-2, f"swapping gate blocks {swap} went unnoticed"
    zero = torch.zeros_like(h0)
    for h_start, c_start in [(zero, c0), (h0, zero)]:
        assert max_diff(run_stack(layers, x, h_start, c_start, explicit=False)[0], fused[0]) > 1e-2


def test_gate_order_matches_torch() -> None:
    assert GATE_ORDER == ("input_gate", "forget_gate", "candidate", "output_gate")
    layer = LSTMLayer(3, 4, forget_bias=2.5)
    assert layer.weight.shape == (16, 7)
    assert layer.recurrent_weight.shape == (16, 4)
    assert layer.input_weight.shape == (16, 3)
    forget_block = slice(GATE_ORDER.index("forget_gate") * 4, (GATE_ORDER.index("forget_gate") + 1) * 4)
    assert torch.all(layer.bias[forget_block] == 2.5)
    others = torch.cat([layer.bias[:4], layer.bias[8:]])
    assert torch.all(others.abs() <= 0.5)  # uniform(-1/sqrt(H), 1/sqrt(H))


# --- the language model: explain() and state handling ----------------------------------------------------------

VOCAB = 13


def make_model(
    seed: int, num_layers: int = 2, embed_size: int = 6, hidden_size: int = 6, dtype: torch.dtype = torch.float32
) -> LSTMLanguageModel:
    torch.manual_seed(seed)
    config = LSTMConfig(
        vocab_size=VOCAB,
        embed_size=embed_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        dropout=0.3,  # must not matter in eval mode
        tie_weights=embed_size == hidden_size,
    )
    model = LSTMLanguageModel(config).to(dtype).eval()
    with torch.no_grad():  # embeddings of unit scale make the gates move well away from 1/2
        model.embedding.weight.normal_(0.0, 1.0)
        for layer in model.layers:
            assert isinstance(layer, LSTMLayer)
            layer.bias.uniform_(-0.5, 1.0)
    return model


def random_state(model: LSTMLanguageModel, batch: int, seed: int) -> LSTMState:
    gen = torch.Generator().manual_seed(seed)
    shape = (model.config.num_layers, batch, model.config.hidden_size)
    dtype = model.embedding.weight.dtype
    return LSTMState(
        torch.rand(shape, generator=gen, dtype=dtype) * 1.8 - 0.9, torch.randn(shape, generator=gen, dtype=dtype)
    )


def random_tokens(batch: int, steps: int, seed: int) -> Tensor:
    return torch.randint(0, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(seed + 7))


def gate_block(layer: LSTMLayer, name: str) -> tuple[Tensor, Tensor]:
    """W_name (H, H + I) and b_name (H,) of one gate, by GATE_ORDER."""
    h = layer.hidden_size
    g = GATE_ORDER.index(name)
    return layer.weight[g * h : (g + 1) * h], layer.bias[g * h : (g + 1) * h]


@PROPERTY
@given(
    num_layers=st.integers(1, 3),
    batch=st.integers(1, 4),
    steps=st.integers(1, 12),
    sizes=st.sampled_from([(6, 6), (4, 7), (9, 3)]),
    seed=st.integers(0, 2**31 - 1),
)
@example(num_layers=3, batch=4, steps=12, sizes=(4, 7), seed=5)
@torch.no_grad()
def test_explain_trace_follows_the_notation(
    num_layers: int, batch: int, steps: int, sizes: tuple[int, int], seed: int
) -> None:
    embed_size, hidden_size = sizes
    model = make_model(seed, num_layers, embed_size, hidden_size)
    tokens = random_tokens(batch, steps, seed)
    state = random_state(model, batch, seed)
    logits, final, trace = model.explain(tokens, state)

    assert isinstance(trace, GateTrace)
    for name, tensor in zip(GateTrace._fields, trace, strict=True):
        assert tensor.shape == (num_layers, batch, steps, hidden_size), name
    f, i, c_tilde, o = trace.forget_gate, trace.input_gate, trace.candidate, trace.output_gate
    for gate in (f, i, o):
        assert bool((gate > 0).all())
        assert bool((gate < 1).all())
    assert bool((c_tilde > -1).all())
    assert bool((c_tilde < 1).all())

    tol = 1e-5
    layers: list[LSTMLayer] = list(model.layers)  # type: ignore[arg-type]
    x = model.embedding(tokens)
    for k, layer in enumerate(layers):
        x_in = x if k == 0 else trace.hidden[k - 1]
        c_prev = torch.cat([state.cell[k].unsqueeze(1), trace.cell[k, :, :-1]], dim=1)  # C_{t-1}, (B, T, H)
        h_prev = torch.cat([state.hidden[k].unsqueeze(1), trace.hidden[k, :, :-1]], dim=1)
        hx = torch.cat([h_prev, x_in], dim=-1)  # [h_{t-1}, x_t]
        for name, act, recorded in [
            ("forget_gate", torch.sigmoid, f[k]),
            ("input_gate", torch.sigmoid, i[k]),
            ("candidate", torch.tanh, c_tilde[k]),
            ("output_gate", torch.sigmoid, o[k]),
        ]:
            weight, bias = gate_block(layer, name)
            assert max_diff(act(hx @ weight.T + bias), recorded) <= tol, f"layer {k} {name}"
        # C_t = f ⊙ C_{t-1} + i ⊙ C̃_t ;  h_t = o ⊙ tanh(C_t)
        assert max_diff(trace.cell[k], f[k] * c_prev + i[k] * c_tilde[k]) <= tol
        assert max_diff(trace.hidden[k], o[k] * torch.tanh(trace.cell[k])) <= tol

    # the carried state is the last step of the trace, and matches the fused forward pass
    assert torch.equal(final.hidden, trace.hidden[:, :, -1])
    assert torch.equal(final.cell, trace.cell[:, :, -1])
    fused_logits, fused_state = model(tokens, state)
    explicit_logits, explicit_state = model(tokens, state, explicit=True)
    assert max_diff(logits, fused_logits) <= tol
    assert max_diff(final.hidden, fused_state.hidden) <= tol
    assert max_diff(final.cell, fused_state.cell) <= tol
    assert torch.equal(logits, explicit_logits)
    assert torch.equal(final.cell, explicit_state.cell)
    assert max_diff(logits, model.decode(trace.hidden[-1])) <= tol  # logits decode the top layer's h_t


def test_explain_needs_eval_mode() -> None:
    model = make_model(0).train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.explain(random_tokens(1, 3, 0))


@PROPERTY
@given(
    batch=st.integers(1, 4),
    steps=st.integers(2, 12),
    cut=st.floats(0.0, 1.0),
    explicit=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@torch.no_grad()
def test_split_sequence_with_carried_state_equals_one_call(
    batch: int, steps: int, cut: float, explicit: bool, seed: int
) -> None:
    model = make_model(seed % 4, num_layers=2)
    tokens = random_tokens(batch, steps, seed)
    state = random_state(model, batch, seed)
    split = min(steps - 1, max(1, round(cut * steps)))
    whole, whole_state = model(tokens, state, explicit=explicit)
    first, mid_state = model(tokens[:, :split], state, explicit=explicit)
    second, split_state = model(tokens[:, split:], mid_state, explicit=explicit)
    assert max_diff(torch.cat([first, second], dim=1), whole) <= 1e-5
    assert max_diff(split_state.hidden, whole_state.hidden) <= 1e-5
    assert max_diff(split_state.cell, whole_state.cell) <= 1e-5


@torch.no_grad()
def test_state_is_passed_in_and_returned_never_kept() -> None:
    model = make_model(3, num_layers=3)
    tokens, other_tokens = random_tokens(2, 7, 1), random_tokens(2, 5, 2)
    state, other_state = random_state(model, 2, 1), random_state(model, 2, 2)
    saved = LSTMState(state.hidden.clone(), state.cell.clone())
    params = {k: v.clone() for k, v in model.state_dict().items()}

    for explicit in (False, True):
        logits, new_state = model(tokens, state, explicit=explicit)
        model(other_tokens, other_state, explicit=explicit)  # an unrelated call in between changes nothing
        again, again_state = model(tokens, state, explicit=explicit)
        assert torch.equal(logits, again)
        assert torch.equal(new_state.hidden, again_state.hidden)
        assert torch.equal(new_state.cell, again_state.cell)
        assert not torch.equal(new_state.hidden, state.hidden)  # it did move
    model.explain(tokens, state)

    # the caller's state is not modified in place, and the module holds no tensors besides its parameters
    assert torch.equal(state.hidden, saved.hidden)
    assert torch.equal(state.cell, saved.cell)
    assert params.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
    for name, module in model.named_modules():
        stray = [k for k, v in vars(module).items() if isinstance(v, Tensor)]
        assert not stray, f"{name or 'model'} keeps tensor attributes {stray}"
    assert all(torch.count_nonzero(b).item() == 0 for b in model.buffers())  # the fused kernel's zero bias


@torch.no_grad()
def test_no_state_means_the_zero_state_and_the_initial_state_matters() -> None:
    model = make_model(4)
    tokens = random_tokens(3, 6, 4)
    zero = model.zero_state(3)
    assert zero.hidden.shape == zero.cell.shape == (2, 3, 6)
    assert torch.count_nonzero(zero.hidden).item() == 0
    assert torch.count_nonzero(zero.cell).item() == 0
    assert torch.equal(model(tokens)[0], model(tokens, zero)[0])
    assert max_diff(model(tokens, random_state(model, 3, 4))[0], model(tokens)[0]) > 1e-3


@torch.no_grad()
def test_batch_rows_are_independent() -> None:
    model = make_model(5)
    tokens = random_tokens(4, 9, 5)
    state = random_state(model, 4, 5)
    logits, new_state = model(tokens, state)
    for row in range(4):
        one = LSTMState(state.hidden[:, row : row + 1], state.cell[:, row : row + 1])
        row_logits, row_state = model(tokens[row : row + 1], one)
        assert max_diff(row_logits, logits[row : row + 1]) <= 1e-5
        assert max_diff(row_state.cell, new_state.cell[:, row : row + 1]) <= 1e-5


@torch.no_grad()
def test_deterministic_under_a_fixed_seed() -> None:
    def run(seed: int) -> tuple[dict[str, Tensor], Tensor]:
        model = make_model(seed, num_layers=2, embed_size=4, hidden_size=7)
        logits, _ = model(random_tokens(2, 6, 0), random_state(model, 2, 0))
        return model.state_dict(), logits

    params_a, logits_a = run(21)
    params_b, logits_b = run(21)
    params_c, logits_c = run(22)
    assert params_a.keys() == params_b.keys()
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    assert torch.equal(logits_a, logits_b)
    assert not torch.equal(params_a["layers.0.weight"], params_c["layers.0.weight"])
    assert max_diff(logits_a, logits_c) > 1e-3


def test_recurrent_dropout_only_in_training() -> None:
    model = make_model(6)
    model.recurrent_dropout = 0.5
    tokens, state = random_tokens(2, 6, 6), random_state(model, 2, 6)
    with torch.no_grad():
        eval_logits, _ = model(tokens, state)
        explicit_logits, _ = model(tokens, state, explicit=True)
        assert max_diff(eval_logits, explicit_logits) <= 1e-5  # eval: no mask, same as the explicit cell
        model.train()
        model.config = LSTMConfig(**{**model.config.to_dict(), "dropout": 0.0})  # isolate the recurrent mask
        torch.manual_seed(0)
        train_logits, _ = model(tokens, state)
    assert max_diff(train_logits, eval_logits) > 1e-4


def test_locked_dropout_at_every_site(monkeypatch: pytest.MonkeyPatch) -> None:
    """Input, between each pair of layers, output: each site drops at `dropout` in training, none in eval."""
    model = make_model(9, num_layers=3)  # dropout 0.3
    seen: list[tuple[float, bool]] = []
    real = lm_module.locked_dropout

    def recording(x: Tensor, p: float, training: bool) -> Tensor:
        seen.append((p, training))
        return real(x, p, training)

    monkeypatch.setattr(lm_module, "locked_dropout", recording)
    model.train()
    model(random_tokens(2, 5, 9), random_state(model, 2, 9))
    assert seen == [(0.3, True)] * 4
    seen.clear()
    model.eval()
    model(random_tokens(2, 5, 9), random_state(model, 2, 9))
    assert seen == [(0.3, False)] * 4


def test_embedding_dropout_drops_whole_word_types() -> None:
    """Every occurrence of a type in a batch is dropped together or kept (rescaled) together."""
    model = make_model(8)
    model.config = LSTMConfig(**{**model.config.to_dict(), "embed_dropout": 0.5})
    model.train()
    tokens = torch.arange(VOCAB).repeat(3, 4)  # every type 12 times, in different rows and steps
    torch.manual_seed(1)
    embedded = model._embed(tokens)
    plain = nn.functional.embedding(tokens, model.embedding.weight)
    scale = (embedded / plain).detach()  # (B, T, E): 0 for a dropped type, 1 / (1 - p) for a kept one
    per_type = [scale[tokens == word] for word in range(VOCAB)]
    for values in per_type:
        assert torch.allclose(values, values[0, 0].expand_as(values))  # one factor per type, everywhere
        assert values[0, 0].item() in (0.0, 2.0)
    dropped = sum(values[0, 0].item() == 0.0 for values in per_type)
    assert 0 < dropped < VOCAB
    model.eval()
    assert torch.equal(model._embed(tokens), plain)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_dropout_mask_drops_p_in_every_lane(p: float) -> None:
    """Zeros come at rate p in each of the four 15-bit lanes a random word is cut into, and the mean is 1."""
    torch.manual_seed(0)
    n = 400_000
    mask = dropout_mask((n,), p)
    scale = 32768 / (32768 - round(p * 32768))
    assert mask.unique().tolist() == [0.0, pytest.approx(scale)]
    # 100,000 draws per lane: a standard error of at most 0.0016 on each rate.
    for lane in range(4):
        dropped = float((mask[lane::4] == 0).float().mean())
        assert dropped == pytest.approx(p, abs=0.007), f"lane {lane}"
    assert float(mask.mean()) == pytest.approx(1.0, abs=0.01)
    torch.manual_seed(0)
    assert torch.equal(dropout_mask((n,), p), mask)  # drawn from the default generator: seeded runs repeat


def test_dropout_mask_shapes_and_bounds() -> None:
    assert torch.equal(dropout_mask((3, 1, 5), 0.0), torch.ones(3, 1, 5))
    assert dropout_mask((7, 3), 0.2, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout_mask((4,), 1.0)
