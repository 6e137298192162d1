"""Expand fused attention calls into plain torch ops so detection can see inside.

Dynamo keeps a few composite calls whole: ``F.multi_head_attention_forward``
(nn.MultiheadAttention), and the inference fast paths
``torch._native_multi_head_attention`` and
``torch._transformer_encoder_layer_fwd``. Each is replaced by an equivalent
graph of linears, reshapes and scaled_dot_product_attention, traced from the
functions below. Calls with options these functions do not cover (bias_k,
add_zero_attn, attention weights that are read, dropout while training) are
left as they are.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .graph_utils import eliminate_dead_code, node_value


def _additive(mask: torch.Tensor | None, is_bool: bool, like: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if is_bool:
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


def _heads_first(t: torch.Tensor, heads: int, seq_first: bool) -> torch.Tensor:
    t = t.unflatten(-1, (heads, -1))
    # seq-first (L, N, H, D) -> (N, H, L, D); batch-first (N, L, H, D) -> (N, H, L, D)
    return t.permute(1, 2, 0, 3) if seq_first else t.transpose(1, 2)


def _heads_last(t: torch.Tensor, seq_first: bool) -> torch.Tensor:
    t = t.permute(2, 0, 1, 3) if seq_first else t.transpose(1, 2)
    return t.flatten(-2)


def _attend(query, key, value, w, b, ow, ob, heads, same_qkv, seq_first, mask, is_causal):
    if same_qkv:
        q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
    else:
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    q, k, v = (_heads_first(t, heads, seq_first) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                         is_causal=is_causal and mask is None)
    return F.linear(_heads_last(out, seq_first), ow, ob)


def _mha_mask(key_padding_mask, attn_mask, like, heads, kinds):
    (kpm_bool, _), (am_bool, am_dim) = kinds
    kpm = _additive(key_padding_mask, kpm_bool, like)
    am = _additive(attn_mask, am_bool, like)
    mask = None
    if am is not None:
        mask = am.unflatten(0, (-1, heads)) if am_dim == 3 else am
    if kpm is not None:
        kpm = kpm[:, None, None, :]
        mask = kpm if mask is None else mask + kpm
    return mask


def _expand_mha(params: dict[str, Any], node: fx.Node) -> Callable | None:
    if params.get("bias_k") is not None or params.get("bias_v") is not None:
        return None
    if params.get("add_zero_attn") or params.get("use_separate_proj_weight"):
        return None
    if params.get("static_k") is not None or params.get("static_v") is not None:
        return None
    if params.get("training") and params.get("dropout_p", 0.0) > 0:
        return None
    heads, causal = params["num_heads"], bool(params.get("is_causal", False))
    same = params["query"] is params["key"] and params["key"] is params["value"]
    q_val = node_value(params["query"])
    if q_val is None or q_val.dim() != 3:
        return None
    kinds = []
    for name in ("key_padding_mask", "attn_mask"):
        m = node_value(params.get(name))
        kinds.append((m is not None and m.dtype == torch.bool, m.dim() if m is not None else 0))

    def fn(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
           key_padding_mask, attn_mask):
        mask = _mha_mask(key_padding_mask, attn_mask, query, heads, kinds)
        out = _attend(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight,
                      out_proj_bias, heads, same, True, mask, causal)
        return out, None

    return fn


def _expand_native_mha(params: dict[str, Any], node: fx.Node) -> Callable | None:
    if params.get("mask") is not None:
        return None
    heads = params["num_head"]
    same = params["query"] is params["key"] and params["key"] is params["value"]

    def fn(query, key, value, qkv_weight, qkv_bias, proj_weight, proj_bias):
        out = _attend(query, key, value, qkv_weight, qkv_bias, proj_weight, proj_bias, heads,
                      same, False, None, False)
        return out, None

    return fn


def _expand_encoder_layer(params: dict[str, Any], node: fx.Node) -> Callable | None:
    if params.get("mask") is not None:
        return None
    heads, eps = params["num_heads"], params["eps"]
    act = F.gelu if params["use_gelu"] else F.relu
    norm_first, dim = params["norm_first"], params["embed_dim"]

    def fn(src, qkv_weight, qkv_bias, proj_weight, proj_bias, norm_weight_1, norm_bias_1,
           norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2):
        def sa(y):
            return _attend(y, y, y, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, True,
                           False, None, False)

        def ff(y):
            return F.linear(act(F.linear(y, ffn_weight_1, ffn_bias_1)), ffn_weight_2, ffn_bias_2)

        def ln1(y):
            return F.layer_norm(y, (dim,), norm_weight_1, norm_bias_1, eps)

        def ln2(y):
            return F.layer_norm(y, (dim,), norm_weight_2, norm_bias_2, eps)

        x = src
        if norm_first:
            x = x + sa(ln1(x))
            return x + ff(ln2(x))
        x = ln1(x + sa(x))
        return ln2(x + ff(x))

    return fn


def _targets() -> dict[Any, tuple[Callable, Callable]]:
    out: dict[Any, tuple[Callable, Callable]] = {
        F.multi_head_attention_forward: (F.multi_head_attention_forward, _expand_mha),
    }
    for name, expander in (("_native_multi_head_attention", _expand_native_mha),
                           ("_transformer_encoder_layer_fwd", _expand_encoder_layer)):
        fn = getattr(torch, name, None)
        if fn is not None:
            out[fn] = (getattr(torch.ops.aten, name).default, expander)
    return out


def _bind(signature_of: Any, node: fx.Node) -> dict[str, Any] | None:
    if isinstance(signature_of, torch._ops.OpOverload):
        names = [a.name for a in signature_of._schema.arguments]
        defaults = {a.name: a.default_value for a in signature_of._schema.arguments
                    if a.has_default_value()}
        if len(node.args) > len(names):
            return None
        params = dict(defaults)
        params.update(zip(names, node.args))
        params.update(node.kwargs)
        return params
    try:
        bound = inspect.signature(signature_of).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def expand_fused_attention(gm: fx.GraphModule) -> int:
    """Replace fused attention calls by plain ops in place; returns how many were expanded.

    Rounds until none is left: a call whose input an earlier expansion made (stacked
    encoder layers, each a fused call) has its shapes only after they are propagated."""
    total = 0
    while True:
        count = _expand_round(gm)
        total += count
        if not count:
            return total


def _expand_round(gm: fx.GraphModule) -> int:
    targets = _targets()
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        sig, expander = targets[node.target]
        params = _bind(sig, node)
        if params is None:
            continue
        scalars = {k: v for k, v in params.items()
                   if isinstance(v, fx.Node) and not isinstance(node_value(v), torch.Tensor)}
        if any(not isinstance(node_value(v), (int, float, bool)) for v in scalars.values()):
            continue  # a symbolic head count or size: leave the call whole
        params.update({k: node_value(v) for k, v in scalars.items()})
        fn = expander(params, node)
        if fn is None:
            continue
        # Only the first output (attention result) may be read.
        users = list(node.users)
        tuple_out = node.target is not torch._transformer_encoder_layer_fwd
        if tuple_out and any(
            u.target is not operator.getitem or u.args[1] != 0 for u in users
        ):
            continue
        arg_names = list(inspect.signature(fn).parameters)
        sub = fx.symbolic_trace(fn, concrete_args={
            n: None for n in arg_names if not isinstance(params.get(n), fx.Node)})
        env: dict[fx.Node, Any] = {}
        sub_placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for ph in sub_placeholders:
            env[ph] = params.get(ph.target)
        with gm.graph.inserting_before(node):
            result = gm.graph.graph_copy(sub.graph, env)
        out = result[0] if tuple_out else result
        if tuple_out:
            for u in users:
                u.replace_all_uses_with(out)
                gm.graph.erase_node(u)
        else:
            node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        count += 1
    if count:
        eliminate_dead_code(gm.graph)
        gm.recompile()
        propagate_shapes(gm)
    return count


def propagate_shapes(gm: fx.GraphModule) -> None:
    """Fill node.meta['val'] for every node with fake values (after a graph edit)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    vals = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes
            if n.op == "placeholder"]
    mode = next((v.fake_mode for v in vals if isinstance(v, FakeTensor)), None)
    if mode is None:
        return
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)
