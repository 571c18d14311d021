"""Padding masks under ``SubmoduleDReS`` (dres_fast/_masks.py states the meaning).

A coded position is valid where any sample it mixes is valid; padded positions are zero in what is
mixed; the loss counts each real sample's valid positions only. So the loss equals a hand computation of
exactly that, and does not change when the padded positions hold something else. Checked on
``nn.TransformerEncoder`` in both batch layouts (the key padding mask is (B, T) either way) and on a
Hugging Face ``BertLayer`` built from a config (its 4-D mask, eager and sdpa).
"""

import pytest
import torch
from torch import nn

import dres_fast
import reference as ref

K, T, C = 6, 5, 8


def _lengths():
    return torch.tensor([5, 3, 4, 2, 5, 1])


def _valid():
    return torch.arange(T)[None, :] < _lengths()[:, None]  # (K, T)


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(C, 2, 16, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.Linear(C, C)).double(), nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).double()


def _hand_loss(run, x, valid):
    """The stated meaning, by hand: samples first, positions second; ``run(x, key_valid)`` calls the block."""
    E, D = ref.dres_weights64(x.shape[0])
    union = valid.any(0).expand(E.shape[0], -1)
    x_coded = torch.einsum("nk,k...->n...", E, x * valid[..., None])
    y, y_coded = run(x, valid), run(x_coded, union)
    r = (y - torch.einsum("kn,n...->k...", D, y_coded)) * valid[..., None]
    return r.square().sum() / (valid.sum() * y.shape[-1])


@pytest.mark.parametrize("mode", ["separate", "concat"])
def test_key_padding_mask_batch_first(mode):
    stem, encoder = _encoder()
    model = nn.Sequential(stem, encoder)
    x, valid = torch.randn(K, T, C, dtype=torch.float64), _valid()
    reg = dres_fast.SubmoduleDReS(model, "1", mode=mode, batch_dim=0)

    def forward(x):
        h = stem(x)
        with reg:
            encoder(h, src_key_padding_mask=~valid)
        return h

    h = forward(x)
    expected = _hand_loss(lambda t, v: encoder(t, src_key_padding_mask=~v), h, valid)
    torch.testing.assert_close(reg.loss, expected, rtol=1e-7, atol=1e-12)
    garbage = x.clone()
    garbage[~valid] = 1e3 * torch.randn(int((~valid).sum()), C, dtype=torch.float64)
    first = reg.loss.detach()
    forward(garbage)
    torch.testing.assert_close(reg.loss.detach(), first, rtol=1e-10, atol=1e-12)  # padded content does not matter


@pytest.mark.parametrize("mode", ["separate", "concat"])
def test_key_padding_mask_sequence_first(mode):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(C, 2, 16, dropout=0.0, batch_first=False)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).double()
    wrapper = nn.Sequential(encoder)
    x, valid = torch.randn(T, K, C, dtype=torch.float64), _valid()  # (T, B, C); the mask stays (B, T)
    reg = dres_fast.SubmoduleDReS(wrapper, "0", mode=mode, batch_dim=1)
    with reg:
        wrapper[0](x, src_key_padding_mask=~valid)

    def run(t, v):  # samples first for the hand computation
        return encoder(t.transpose(0, 1), src_key_padding_mask=~v).transpose(0, 1)

    expected = _hand_loss(run, x.transpose(0, 1), valid)
    torch.testing.assert_close(reg.loss, expected, rtol=1e-7, atol=1e-12)


def test_a_mask_whose_axis_is_ambiguous_or_meaning_unknown_is_refused():
    stem, encoder = _encoder()
    wrapper = nn.Sequential(encoder)
    x = torch.randn(T, T, C, dtype=torch.float64)  # T == K: is the mask's first axis the samples?
    reg = dres_fast.SubmoduleDReS(wrapper, "0", batch_dim=1)
    with pytest.raises(ValueError, match="not clear which holds the samples"):
        with reg:
            wrapper[0](x, src_key_padding_mask=torch.zeros(T, T, dtype=torch.bool))

    class Block(nn.Module):
        def forward(self, x, attn_mask):
            return x * attn_mask[:, 0, 0, :, None]

    model = nn.Sequential(Block())
    reg = dres_fast.SubmoduleDReS(model, "0")
    with pytest.raises(ValueError, match="convention"):
        with reg:
            model[0](torch.randn(K, T, C), attn_mask=torch.ones(K, 1, 1, T, dtype=torch.bool))


def test_additive_mask_values_other_than_attend_or_masked_are_refused():
    class Block(nn.Module):
        def forward(self, x, mask):
            return x + mask[:, 0, 0, :, None]

    model = nn.Sequential(Block())
    reg = dres_fast.SubmoduleDReS(model, "0")
    bias = torch.zeros(K, 1, 1, T)
    bias[0, 0, 0, 1] = 0.5
    with pytest.raises(ValueError, match="0 \\(attend\\) or -inf"):
        with reg:
            model[0](torch.randn(K, T, C), mask=bias)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_layer_attention_mask(attn):
    """A Hugging Face BertLayer gets a (B, 1, T, T) mask (additive float for eager, bool True = attend for
    sdpa), positionally: the loss is the stated meaning computed by hand, in both cases."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.BertConfig(vocab_size=50, hidden_size=C, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation=attn)
    model = transformers.BertModel(config).double().train()
    ids, valid = torch.randint(0, 50, (K, T)), _valid()
    layer = model.encoder.layer[1]
    seen = {}
    # the first call is the real one (the coded call enters the layer again)
    capture = layer.register_forward_pre_hook(lambda module, args: seen.setdefault("real", args) and None)
    reg = dres_fast.SubmoduleDReS(model, "encoder.layer.1")
    with reg:
        model(input_ids=ids, attention_mask=valid.long())
    capture.remove()
    hidden, mask = seen["real"][0], seen["real"][1]
    assert mask.shape == (K, 1, T, T) and (mask.dtype == torch.bool) == (attn == "sdpa")

    def as_mask(v):  # the layer's own format for key validity v (n, T)
        keys = v[:, None, None, :].expand(v.shape[0], 1, T, T)
        if mask.dtype == torch.bool:
            return keys
        attend, masked = torch.zeros((), dtype=mask.dtype), torch.tensor(torch.finfo(mask.dtype).min, dtype=mask.dtype)
        return torch.where(keys, attend, masked)

    expected = _hand_loss(lambda t, v: layer(t, as_mask(v)), hidden.detach(), valid)
    torch.testing.assert_close(reg.loss, expected, rtol=1e-7, atol=1e-12)


def test_principal_order_does_not_read_padded_positions():
    """order="principal" sorts the batch; the sort must come from the masked batch, or garbage in padded
    positions would move the order and the loss."""
    stem, encoder = _encoder()
    x, valid = torch.randn(K, T, C, dtype=torch.float64), _valid()
    garbage = torch.where(valid[..., None], x, 100 * torch.randn_like(x))
    losses = []
    for batch in (x, garbage):
        reg = dres_fast.SubmoduleDReS(encoder, "", batch_dim=0, order="principal")
        with reg:
            encoder(batch, src_key_padding_mask=~valid)
        losses.append(reg.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)


def test_a_shared_square_mask_is_not_taken_for_a_padding_mask():
    """A causal (T, T) src_mask with T == K is shared by all samples: it reaches the coded call unchanged."""
    layer = nn.TransformerEncoderLayer(C, 2, 16, dropout=0.0, batch_first=True)
    causal = nn.Transformer.generate_square_subsequent_mask(K)
    seen = []
    layer.self_attn.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("attn_mask")),
                                              with_kwargs=True)
    reg = dres_fast.SubmoduleDReS(layer, "", batch_dim=0, extra_args="pass")
    with reg:
        layer(torch.randn(K, K, C), src_mask=causal)
    assert len(seen) == 2 and all(torch.equal(mask, causal) for mask in seen)


@pytest.mark.slow
def test_an_additive_mask_compiles_without_a_host_sync():
    """The additive-mask check runs on the device outside eager CPU: torch.compile(fullgraph=True) traces
    it, and the loss equals eager."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(C, C)

        def forward(self, x, attention_mask=None):
            weights = torch.softmax(x @ x.transpose(1, 2) + attention_mask[:, None, :], -1)
            return torch.tanh(self.lin(weights @ x))

    torch.manual_seed(0)
    model = nn.Sequential(Block())
    mask = torch.zeros(K, T).masked_fill(~_valid(), float("-inf"))
    x = torch.randn(K, T, C)
    reg = dres_fast.SubmoduleDReS(model, "0")
    with reg:
        model[0](x, attention_mask=mask)
    eager = reg.loss.detach().clone()
    compiled = torch.compile(lambda x, m: model[0](x, attention_mask=m), fullgraph=True)
    with reg:
        compiled(x, mask)
    torch.testing.assert_close(reg.loss.detach(), eager, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()
