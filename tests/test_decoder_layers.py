"""Masks beyond padding under ``SubmoduleDReS``: causal decoder layers, key/value caches, cross-attention,
mixed keys and values, pooled outputs (dres_fast/_masks.py states the meaning).

What each case means:

* **causal**: the coded call runs through the same causal layer. Coded query ``q`` attends to key ``t``
  where some real sample's query ``q`` does and ``t`` holds data in some sample; a causal mask with
  padding becomes ``causal AND union of the samples' positions``, never a bidirectional one. So the loss
  of a Hugging Face decoder layer is the hand computation of exactly that, and the same whichever
  attention implementation (eager: a float mask; sdpa: a bool mask, or none and ``is_causal``) runs.
* **cache**: Hugging Face decoders pass a key/value cache to each layer (``use_cache`` is on by default
  in training). The coded samples are not the batch's samples: they get no cache, so they neither
  attend to the batch's cached keys nor append theirs. The loss is the same with and without
  ``use_cache``, the returned cache holds the real batch only (concat mode: nothing for the hooked
  layer, whose one call carries both), and a cache that held positions before the call (generation,
  prefix tuning; a Cache object or a ``layer_past`` tuple) is refused with the argument's name.
* **unmasked rows**: rows a library made attend to every key because they attended to nothing (left
  padding under sdpa in some transformers versions) hold no data and keep the coded mask causal.
* **lower-rank arguments**: a mixed ``(K, T)`` argument next to a ``(K, T, C)`` batch is read per
  position and zeroed where the mask pads (a NaN there does not reach the loss), with a warning that a
  per-sample vector of width ``T`` would be misread.
* **cross-attention**: ``encoder_attention_mask`` marks the encoder's positions, not the batch's; the
  batch's positions all count, and the mixed encoder states have their padded positions zeroed.
* **mixed keys and values** (``extra_args="mix"``): their padded positions are zeroed like the batch's,
  so what padded positions hold does not reach the loss.
* **pooled output**: with fewer axes than the input and not ``T`` entries on axis 1, every entry counts;
  a lower-rank output with ``T`` entries there (token scores) is read per position, with a warning.
* **recorded outputs**: transformers 5 records hidden states, attentions and router logits with hooks on
  each layer; a coded call adds nothing to them (the MoE auxiliary loss is the plain model's), eager and
  compiled; concat mode, whose one call carries both batches, refuses to run while they are recorded.
* **flex_attention**: its ``BlockMask`` is not a tensor to recode; it is refused by name.
* **non-finite padded rows**: a mask over queries too leaves padded query rows NaN; the loss selects
  them out (it does not multiply them by zero), so it stays finite (its gradient is the layer's own
  business: a backward through a fully masked softmax row is NaN with or without DReS).
"""

import pytest
import torch
from torch import nn

import dres_fast
import reference as ref

K, T, C = 6, 5, 8
LENGTHS = torch.tensor([5, 3, 4, 2, 5, 1])


def _valid(lengths=LENGTHS):
    return torch.arange(T)[None, :] < lengths[:, None]  # (K, T)


def _transformers():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (the 'integrations' extra)")
    transformers.logging.set_verbosity_error()
    return transformers


def _gpt2(transformers, attn, **extra):
    config = transformers.GPT2Config(vocab_size=50, n_embd=C, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn, initializer_range=0.5,
                                     bos_token_id=0, eos_token_id=0, **extra)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().train()


def _llama(transformers, attn):
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      attn_implementation=attn, initializer_range=0.5)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().train()


def _ids():
    return torch.randint(1, 50, (K, T), generator=torch.Generator().manual_seed(1))


def _real_call(layer, run):
    """(args, kwargs) of the first call of ``layer`` while ``run()`` runs (the real one: the coded call
    enters the layer again)."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args, kwargs)) and None,
                                             with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def _loss_by_hand(y, y_coded, valid):
    E, D = ref.dres_weights64(K)
    r = torch.where(valid[..., None], y - torch.einsum("kn,n...->k...", D, y_coded), torch.zeros((), dtype=y.dtype))
    return r.square().sum() / (valid.sum() * y.shape[-1])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_layer_with_padding_stays_causal_for_the_coded_samples(attn):
    transformers = _transformers()
    model, valid = _gpt2(transformers, attn), _valid(torch.tensor([4, 3, 4, 2, 4, 1]))  # the last key padded in all
    layer = model.transformer.h[1]
    reg = dres_fast.SubmoduleDReS(model, "transformer.h.1")

    def run():
        with reg:
            model(input_ids=_ids(), attention_mask=valid.long(), use_cache=False)

    args, kwargs = _real_call(layer, run)
    mask = kwargs["attention_mask"] if "attention_mask" in kwargs else args[2]
    assert mask.shape == (K, 1, T, T)
    attend = mask if mask.dtype == torch.bool else mask == 0
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    coded_attend = causal & valid.any(0)  # the stated meaning, written from the causal mask, not from `mask`
    assert torch.equal(attend.any(0)[0] & valid.any(0), coded_attend) and not valid.any(0).all()
    coded_mask = coded_attend.expand(K, 1, T, T)
    if mask.dtype != torch.bool:
        zero, masked = torch.zeros((), dtype=mask.dtype), torch.tensor(torch.finfo(mask.dtype).min, dtype=mask.dtype)
        coded_mask = torch.where(coded_mask, zero, masked)
    hidden = args[0].detach()
    E, _ = ref.dres_weights64(K)
    with torch.no_grad():
        y = layer(hidden, attention_mask=mask)
        y_coded = layer(torch.einsum("nk,k...->n...", E, hidden * valid[..., None]), attention_mask=coded_mask)
    torch.testing.assert_close(reg.loss.detach(), _loss_by_hand(y, y_coded, valid), rtol=1e-9, atol=1e-12)


def test_llama_layer_loss_does_not_depend_on_the_attention_implementation_or_the_cache():
    """Without padding, sdpa passes no mask (is_causal) and eager a causal float mask: both are causal for
    the coded call, so the losses agree; use_cache (on by default) changes nothing."""
    transformers = _transformers()
    losses = {}
    for attn in ("eager", "sdpa"):
        for use_cache in (True, False):
            model = _llama(transformers, attn)
            reg = dres_fast.SubmoduleDReS(model, "model.layers.1")
            with reg:
                model(input_ids=_ids(), use_cache=use_cache)
            losses[attn, use_cache] = reg.loss.detach()
    for attn in ("eager", "sdpa"):
        torch.testing.assert_close(losses[attn, True], losses[attn, False], rtol=1e-12, atol=0)
    # the two implementations differ by 4e-7 (relative) in the layer's own output; a bidirectional coded
    # call (before the fix) differed by 6% here
    torch.testing.assert_close(losses["sdpa", False], losses["eager", False], rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["separate", "concat"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_coded_call_gets_no_cache(attn, mode):
    transformers = _transformers()
    results = []
    for use_cache in (True, False):
        model = _gpt2(transformers, attn)
        reg = dres_fast.SubmoduleDReS(model, "transformer.h.1", mode=mode)
        with reg:
            out = model(input_ids=_ids(), use_cache=use_cache)
        results.append(reg.loss.detach())
        if use_cache and mode == "separate":  # the real call alone filled the cache
            assert out.past_key_values.get_seq_length(1) == T
            assert out.past_key_values.layers[1].keys.shape[0] == K
        if use_cache and mode == "concat":  # one call carries real and coded samples: the layer's cache stays empty
            assert out.past_key_values.get_seq_length(1) == 0 and out.past_key_values.get_seq_length(0) == T
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=0)


def test_a_cache_holding_earlier_positions_is_refused():
    transformers = _transformers()
    model = _gpt2(transformers, "eager")
    ids = _ids()
    with torch.no_grad():
        past = model(input_ids=ids[:, :2], use_cache=True).past_key_values
    reg = dres_fast.SubmoduleDReS(model, "transformer.h.1")
    with pytest.raises(ValueError, match=r"holds 2 positions from before this call.*use_cache=False"):
        with reg:
            model(input_ids=ids[:, 2:], cache=past, use_cache=True)


class _TupleCacheBlock(nn.Module):
    """An older-style layer: ``layer_past`` is a (keys, values) tuple of earlier positions, or None."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(C, C)

    def forward(self, x, layer_past=None, past_key_values=None):
        keys = x if layer_past is None else torch.cat([layer_past[0], x], dim=1)
        return torch.tanh(self.linear(x) + keys.mean(1, keepdim=True))


@pytest.mark.parametrize("mode", ["separate", "concat"])
def test_a_tuple_cache_is_dropped_when_empty_and_refused_with_a_prefix(mode):
    torch.manual_seed(0)
    block, x = _TupleCacheBlock().double(), torch.randn(K, T, C, dtype=torch.float64)
    with dres_fast.SubmoduleDReS(block, "", mode=mode) as reg:
        block(x, layer_past=None)
    torch.testing.assert_close(reg.loss, dres_fast.dres_loss(block, x))
    prefix = (torch.randn(K, 2, C, dtype=torch.float64),) * 2
    with pytest.raises(ValueError, match="'layer_past' holds 2 positions from before this call"):
        with dres_fast.SubmoduleDReS(block, "", mode=mode):
            block(x, layer_past=prefix)


class _SelfAttention(nn.Module):  # causal or not: the mask says
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(C, C)

    def forward(self, x, attention_mask):
        return torch.softmax(self.query(x) @ x.transpose(1, 2) + attention_mask[:, 0], -1) @ x


def test_rows_unmasked_for_sdpa_do_not_make_the_coded_mask_bidirectional():
    """Left padding: a padded query attends to nothing, and some transformers versions make such rows attend
    to every key instead (``_unmask_unattended``, for sdpa). Those rows hold no data, so the loss is the one
    of the plain causal mask, and the coded mask stays causal."""
    torch.manual_seed(0)
    block = _SelfAttention().double()
    x, lengths = torch.randn(K, T, C, dtype=torch.float64), torch.tensor([5, 3, 4, 2, 5, 1])
    valid = torch.arange(T)[None, :] >= (T - lengths)[:, None]  # left padding
    attend = torch.tril(torch.ones(T, T, dtype=torch.bool)) & valid[:, None, :]
    unmasked = attend | ~attend.any(-1, keepdim=True)  # rows that attended to nothing now attend to all
    seen, losses = [], []
    block.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    for pattern in (attend, unmasked):
        mask = torch.zeros(K, 1, T, T, dtype=torch.float64).masked_fill(~pattern[:, None], float("-inf"))
        with dres_fast.SubmoduleDReS(block, "") as reg:
            block(x, attention_mask=mask)
        losses.append(reg.loss.detach())
    causal_coded = seen[3][0, 0] == 0
    assert torch.equal(causal_coded, torch.tril(torch.ones(T, T, dtype=torch.bool)))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)


class _Conditioned(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(C, C)

    def forward(self, x, condition, attention_mask):
        return torch.tanh(self.linear(x) * condition.mean(1)[:, None, None] * attention_mask[..., None].to(x.dtype))


def test_a_lower_rank_argument_with_t_entries_is_zeroed_per_position_with_a_warning():
    """A mixed (K, T) argument next to a (K, T, C) batch: per-token values (their padded entries must not reach
    a coded sample) or a per-sample vector of width T? It is read per position
    and zeroed where the mask pads (the coded call gets E of the zeroed values), with one warning."""
    torch.manual_seed(0)
    block, valid = _Conditioned().double(), _valid()
    x, condition = torch.randn(K, T, C, dtype=torch.float64), torch.randn(K, T, dtype=torch.float64)
    seen = []
    block.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    with pytest.warns(UserWarning, match="'condition' .* is read as one value per position"):
        with dres_fast.SubmoduleDReS(block, "", extra_args="mix"):
            block(x, condition.masked_fill(~valid, 1e3), valid)
    E, _ = ref.dres_weights64(K)
    torch.testing.assert_close(seen[1], E @ (condition * valid), rtol=1e-12, atol=1e-14)


class _TokenScores(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(C, 1)

    def forward(self, x, attention_mask):
        return self.linear(x).squeeze(-1) * attention_mask.to(x.dtype)


def test_a_per_position_output_of_lower_rank_is_masked_with_a_warning():
    """(K, T, C) -> (K, T) token scores: read per position (masked), with one warning that a pooled output of
    width T would be misread."""
    torch.manual_seed(0)
    block, valid = _TokenScores().double(), _valid()
    x = torch.randn(K, T, C, dtype=torch.float64)
    with pytest.warns(UserWarning, match="read as one value per position"):
        with dres_fast.SubmoduleDReS(block, "") as reg:
            y = block(x, attention_mask=valid)
    E, _ = ref.dres_weights64(K)
    with torch.no_grad():
        y_coded = block(torch.einsum("nk,k...->n...", E, x * valid[..., None]), valid.any(0).expand(K, T))
    expected = _loss_by_hand(y.detach()[..., None], y_coded[..., None], valid)
    torch.testing.assert_close(reg.loss.detach(), expected, rtol=1e-9, atol=1e-12)


class _CrossBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(C, C)

    def forward(self, hidden, encoder_hidden_states, encoder_attention_mask):
        scores = self.query(hidden) @ encoder_hidden_states.transpose(1, 2) + encoder_attention_mask[:, 0]
        return torch.tanh(hidden + torch.softmax(scores, -1) @ encoder_hidden_states)


def test_a_cross_attention_mask_marks_the_encoder_positions_not_the_batch():
    """S == T on purpose: the sizes cannot tell the two sequences apart, the name does."""
    torch.manual_seed(0)
    block = _CrossBlock().double()
    hidden, states = torch.randn(K, T, C, dtype=torch.float64), torch.randn(K, T, C, dtype=torch.float64)
    encoder_valid = _valid()
    mask = torch.zeros(K, 1, 1, T, dtype=torch.float64).masked_fill(~encoder_valid[:, None, None, :], float("-inf"))
    garbage = torch.where(encoder_valid[..., None], states, 1e3)
    reg = dres_fast.SubmoduleDReS(block, "", extra_args="mix")
    with reg:
        y = block(hidden, encoder_hidden_states=garbage, encoder_attention_mask=mask)
    E, _ = ref.dres_weights64(K)
    coded_mask = mask[:1].clone().fill_(0).masked_fill(~encoder_valid.any(0), float("-inf")).expand(K, 1, 1, T)
    with torch.no_grad():
        y_coded = block(torch.einsum("nk,k...->n...", E, hidden),  # every position of the batch holds data
                        torch.einsum("nk,k...->n...", E, states * encoder_valid[..., None]), coded_mask)
    every_position = torch.ones(K, T, dtype=torch.bool)
    torch.testing.assert_close(reg.loss.detach(), _loss_by_hand(y.detach(), y_coded, every_position), rtol=1e-9, atol=1e-12)


class _ContextAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(C, 2, batch_first=True)

    def forward(self, x, context, key_padding_mask):
        return self.attention(x, context, context, key_padding_mask=key_padding_mask, need_weights=False)[0]


@pytest.mark.parametrize("mode", ["separate", "concat"])
def test_mixed_keys_and_values_have_their_padded_positions_zeroed(mode):
    torch.manual_seed(0)
    block, valid = _ContextAttention().double(), _valid()
    x, context = torch.randn(K, T, C, dtype=torch.float64), torch.randn(K, T, C, dtype=torch.float64)
    losses = []
    for fill in (None, 1e3):
        filled = [t if fill is None else torch.where(valid[..., None], t, fill) for t in (x, context)]
        reg = dres_fast.SubmoduleDReS(block, "", extra_args="mix", mode=mode)
        with reg:
            block(*filled, key_padding_mask=~valid)
        losses.append(reg.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-14)


class _Pooled(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(C, width)

    def forward(self, x, attention_mask):
        weights = attention_mask[..., None].to(x.dtype)
        return torch.tanh(self.linear((x * weights).sum(1) / weights.sum(1)))


def test_a_pooled_output_counts_every_entry():
    torch.manual_seed(0)
    x, valid = torch.randn(K, T, C, dtype=torch.float64), _valid()
    block = _Pooled(3).double()
    reg = dres_fast.SubmoduleDReS(block, "")
    with reg:
        y = block(x, attention_mask=valid.long())
    E, _ = ref.dres_weights64(K)
    coded_mask = valid.any(0).long().expand(K, T)
    with torch.no_grad():
        y_coded = block(torch.einsum("nk,k...->n...", E, x * valid[..., None]), coded_mask)
    expected = _loss_by_hand(y.detach()[:, None], y_coded[:, None], torch.ones(K, 1, dtype=torch.bool))
    torch.testing.assert_close(reg.loss.detach(), expected, rtol=1e-9, atol=1e-12)


def test_padded_query_rows_that_come_out_nan_do_not_reach_the_loss():
    torch.manual_seed(0)
    block, valid = _SelfAttention().double(), _valid()
    x = torch.randn(K, T, C, dtype=torch.float64)
    padded = ~valid
    mask = torch.zeros(K, 1, T, T, dtype=torch.float64).masked_fill(padded[:, None, None, :] | padded[:, None, :, None],
                                                                    float("-inf"))
    reg = dres_fast.SubmoduleDReS(block, "")
    with reg:
        y = block(x, attention_mask=mask)
    assert torch.isnan(y[padded]).all() and torch.isfinite(y[valid]).all()
    union = valid.any(0)
    coded_mask = torch.zeros(K, 1, T, T, dtype=torch.float64).masked_fill(~(union[:, None] & union[None, :]), float("-inf"))
    E, _ = ref.dres_weights64(K)
    with torch.no_grad():
        y_coded = block(torch.einsum("nk,k...->n...", E, x * valid[..., None]), coded_mask)
    loss = reg.loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), _loss_by_hand(y.detach(), y_coded, valid), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("compiled", [None, "model", "layer"])
def test_the_coded_call_is_not_among_the_recorded_outputs(compiled):
    """transformers 5 records hidden states, attentions and router logits with forward hooks on every layer:
    the coded call of a hooked layer must not add entries (it would shift every later index and enter an
    MoE's auxiliary loss), eager, whole model compiled or one layer compiled. Concat mode, whose one call
    carries both batches, is refused while recording (eager: compiled code cannot see the recording)."""
    transformers = _transformers()
    model = _llama(transformers, "sdpa")
    plain = model(input_ids=_ids(), output_hidden_states=True).hidden_states
    reg = dres_fast.SubmoduleDReS(model, "model.layers.1").attach()
    if compiled == "layer":  # regional compilation: the recording is then started outside the compiled code
        model.model.layers[1].compile(backend="eager")
    run = torch.compile(model, backend="eager") if compiled == "model" else model
    hidden = run(input_ids=_ids(), output_hidden_states=True)
    reg.detach()
    assert len(hidden.hidden_states) == len(plain) and all(torch.equal(a, b) for a, b in zip(hidden.hidden_states, plain))
    torch._dynamo.reset()
    if compiled:  # compiled code cannot read transformers' context variable, so concat cannot tell (README)
        return
    with pytest.raises(RuntimeError, match="records its layers' outputs.*mode='separate'"):
        with dres_fast.SubmoduleDReS(model, "model.layers.1", mode="concat"):
            run(input_ids=_ids(), output_hidden_states=True)
    with dres_fast.SubmoduleDReS(model, "model.layers.1.mlp", mode="concat"):  # nothing recorded inside it
        assert len(run(input_ids=_ids(), output_hidden_states=True).hidden_states) == len(plain)
    torch._dynamo.reset()


def test_an_moe_auxiliary_loss_sees_the_real_batch_only():
    transformers = _transformers()
    config = transformers.MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, output_router_logits=True)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).train()
    plain = model(input_ids=_ids(), labels=_ids())
    with dres_fast.SubmoduleDReS(model, "model.layers.1"):
        hooked = model(input_ids=_ids(), labels=_ids())
    assert len(hooked.router_logits) == 2
    torch.testing.assert_close(hooked.aux_loss, plain.aux_loss, rtol=0, atol=0)


class _FlexBlock(nn.Module):
    def forward(self, x, attention_mask):
        return torch.tanh(x)


def test_a_per_sample_flex_attention_block_mask_is_refused_by_name():
    """A BlockMask with the batch's samples has no coded meaning (refused); one shared by every sample (batch
    1: plain causal) is passed unchanged, which is exact."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    block = _FlexBlock()
    per_sample = flex.create_block_mask(lambda b, h, q, kv: q >= kv, B=K, H=None, Q_LEN=T, KV_LEN=T, device="cpu")
    with pytest.raises(ValueError, match="'attention_mask' is a flex_attention BlockMask.*sdpa"):
        with dres_fast.SubmoduleDReS(block, ""):
            block(torch.randn(K, T, C), attention_mask=per_sample)
    shared = flex.create_block_mask(lambda b, h, q, kv: q >= kv, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cpu")
    x = torch.randn(K, T, C)
    with dres_fast.SubmoduleDReS(block, "") as reg:
        block(x, attention_mask=shared)
    torch.testing.assert_close(reg.loss, dres_fast.dres_loss(torch.tanh, x))


def test_a_global_row_that_attends_everywhere_is_kept():
    """A global token (row 0 attends to every key, every row attends to it) in a causal mask: a full row that
    other rows attend to is data, not a row a library unmasked; the coded mask keeps it full."""
    torch.manual_seed(0)
    block = _SelfAttention().double()
    attend = torch.tril(torch.ones(T, T, dtype=torch.bool))
    attend[0] = True
    mask = torch.zeros(K, 1, T, T, dtype=torch.float64).masked_fill(~attend, float("-inf"))
    seen = []
    block.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    with dres_fast.SubmoduleDReS(block, "") as reg:
        block(torch.randn(K, T, C, dtype=torch.float64), attention_mask=mask)
    assert torch.equal(seen[1][0, 0] == 0, attend) and torch.isfinite(reg.loss)


def test_nested_tuple_caches_with_earlier_positions_are_refused():
    """Legacy past_key_values: one (keys, values) pair per layer, for a hooked stack."""
    torch.manual_seed(0)
    block, x = _TupleCacheBlock().double(), torch.randn(K, T, C, dtype=torch.float64)
    pairs = tuple((torch.randn(K, 3, C, dtype=torch.float64),) * 2 for _ in range(2))
    with pytest.raises(ValueError, match="'past_key_values' holds 3 positions"):
        with dres_fast.SubmoduleDReS(block, ""):
            block(x, past_key_values=pairs)


class _MisnamedCross(nn.Module):
    def forward(self, hidden, context, attention_mask):  # the mask covers `context`, but its name says the batch
        return torch.tanh(hidden + (torch.softmax(hidden @ context.transpose(1, 2) + attention_mask[:, 0], -1) @ context))


def test_a_mask_over_another_sequence_named_like_the_batch_is_named_in_the_error():
    block = _MisnamedCross()
    mask = torch.zeros(K, 1, 1, T + 2)
    with pytest.raises(ValueError, match="'attention_mask' marks 7 positions.*another sequence.*encoder_attention_mask"):
        with dres_fast.SubmoduleDReS(block, "", extra_args="mix"):
            block(torch.randn(K, T, C), torch.randn(K, T + 2, C), attention_mask=mask)


def test_after_a_compiled_transformers_model_a_plain_model_still_compiles_whole():
    """After a compiled transformers model has recorded outputs, the recorder lookup in the hooks must not add
    graphs for a model that is not from transformers: fullgraph=True, one graph. (Reading it through
    transformers' own get() there recompiled: four graphs where two were expected in the every=4 test.)"""
    from torch._dynamo.utils import counters

    transformers = _transformers()
    torch.compile(_llama(transformers, "sdpa"), backend="eager")(input_ids=_ids(), output_hidden_states=True)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, 16), nn.Tanh(), nn.Linear(16, 3))
    reg = dres_fast.SubmoduleDReS(model, "2").attach()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        (compiled(torch.randn(K, C)).sum() + reg.loss).backward()
    reg.detach()
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


class _PooledBackbone(nn.Module):
    """A head that pools every hidden state of a transformers backbone (a reward model's pattern)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return torch.stack(self.backbone(inputs_embeds=x, output_hidden_states=True).hidden_states).mean(0)


def test_a_transformers_model_inside_the_hooked_module_records_its_own_outputs():
    """The coded call of a module that contains a transformers model: that model's own recording (its
    hidden states, which the module pools) still works, and no recording state is left behind."""
    transformers = _transformers()
    from transformers.utils import output_capturing

    block = _PooledBackbone(_llama(transformers, "eager").model)
    x = torch.randn(K, T, 16, dtype=torch.float64)
    with dres_fast.SubmoduleDReS(block, "") as reg:
        block(x)
    torch.testing.assert_close(reg.loss, dres_fast.dres_loss(block, x), rtol=1e-12, atol=0)
    collector = output_capturing._active_collector
    assert collector.context_var.get() is None and not collector.compiling and collector.global_var is None


def test_concat_runs_when_nothing_inside_the_hooked_module_records_what_is_asked():
    """Mixtral's sparse block holds a router whose hook records router logits; with only hidden states asked
    for, nothing inside it records, so concat mode runs (and the hidden states equal the plain model's)."""
    transformers = _transformers()
    config = transformers.MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).train()
    plain = model(input_ids=_ids(), output_hidden_states=True).hidden_states
    with dres_fast.SubmoduleDReS(model, "model.layers.1.mlp", mode="concat") as reg:
        hidden = model(input_ids=_ids(), output_hidden_states=True).hidden_states
    assert torch.isfinite(reg.loss) and len(hidden) == len(plain)
    with pytest.raises(RuntimeError, match="records its layers' outputs"):
        with dres_fast.SubmoduleDReS(model, "model.layers.1.mlp", mode="concat"):
            model(input_ids=_ids(), output_router_logits=True)


def test_second_derivatives_through_a_masked_causal_step():
    """A gradient penalty on top of DReS (create_graph=True) on a masked causal block: the masked loss is plain
    torch around one spline_mix, so gradcheck and gradgradcheck hold in float64."""
    torch.manual_seed(0)
    block, valid = _SelfAttention().double(), _valid()
    attend = torch.tril(torch.ones(T, T, dtype=torch.bool)) & valid[:, None, :]
    mask = torch.zeros(K, 1, T, T, dtype=torch.float64).masked_fill(~attend[:, None], float("-inf"))

    def loss_of(x):
        with dres_fast.SubmoduleDReS(block, "") as reg:
            block(x, attention_mask=mask)
        return reg.loss

    x = torch.randn(K, T, C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss_of, (x,)) and torch.autograd.gradgradcheck(loss_of, (x,))
