"""Every shared layer and both block types, PyTorch vs JAX on the same weights and inputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_l2
from twins import inputs, out, twins

import minflux_jax.flux1 as j1
import minflux_jax.flux2 as j2
import minflux_jax.layers as jl
import minflux_torch.flux1 as t1
import minflux_torch.flux2 as t2
import minflux_torch.layers as tl
from minflux import configs

BOUND = {"fp32": 1e-5, "bf16": 1e-2}  # DESIGN.md, per block
D, H, HEAD = 64, 2, 32


def pe_pair(rng, n_axes, length):
    """RoPE tables built by each framework from the same integer ids."""
    axes = (8, 12, 12) if n_axes == 3 else (8, 8, 8, 8)
    ids = rng.integers(0, 40, size=(2, length, n_axes)).astype(np.float32)
    return tl.EmbedND(HEAD, 10_000, axes)(torch.from_numpy(ids)), jl.EmbedND(HEAD, 10_000, axes)(
        ids
    )


def test_timestep_embedding_and_rope(rng):
    t = rng.random(5).astype(np.float32)
    assert (
        rel_l2(
            out(jl.timestep_embedding(t, 256)), out(tl.timestep_embedding(torch.from_numpy(t), 256))
        )
        < 1e-6
    )
    a, b = pe_pair(rng, 4, 33)
    assert rel_l2(out(b), out(a)) < 1e-6


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_norms_embedders_modulation(rng, dtype):
    (x,), (xj,) = inputs(rng, (2, 7, D), dtype=dtype)
    (v,), (vj,) = inputs(rng, (2, D), dtype=dtype)
    cases = [
        (tl.RMSNorm, jl.RMSNorm, (D,), lambda m, x, v: m(x)),
        (tl.MLPEmbedder, jl.MLPEmbedder, (D, D), lambda m, x, v: m(v)),
        (tl.LastLayer, jl.LastLayer, (D, 16), lambda m, x, v: m(x, v)),
        (
            tl.Modulation,
            jl.Modulation,
            (D, True),
            lambda m, x, v: m(v)[1][2],
        ),  # the last of six: mod2 gate
    ]
    for tcls, jcls, args, call in cases:
        t, j = twins(tcls, jcls, *args, dtype=dtype)
        with torch.no_grad():
            ref = call(t, x, v)
        err = rel_l2(out(call(j, xj, vj)), out(ref))
        assert err < BOUND[dtype], (tcls.__name__, err)


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_mlp_and_attention(rng, family):
    t, j = twins(tl.SelfAttention, jl.SelfAttention, D, H, True, True)
    (x,), (xj,) = inputs(rng, (2, 9, D))
    tq, jq = t.qkv_heads(x), j.qkv_heads(xj)
    for a, b in zip(jq, tq, strict=True):
        assert rel_l2(out(a), out(b)) < 1e-5
    pe_t, pe_j = pe_pair(rng, 3 if family == "flux1" else 4, 9)
    assert rel_l2(out(jl.attention(*jq, pe_j)), out(tl.attention(*tq, pe_t))) < 1e-5

    params = configs.get(f"{family}-tiny")  # the family's MLP: gated or not, biases or not
    tm, jm = twins(tl.mlp, jl.mlp, D, 3 * D, params.gated_mlp, params.bias)
    assert rel_l2(out(jm(xj)), out(tm(x))) < 1e-5


def test_attention_kv(rng):
    """klein KV attention: the first step (the last n tokens references, which see only themselves) against
    torch's masked SDPA, and returning the references' keys and values; the cached step, without the references,
    against the first step's other tokens; PyTorch against JAX. The cache is returned, never written into."""
    L, n = 9, 4
    (q, k, v), (qj, kj, vj) = inputs(rng, *[(2, H, L, HEAD)] * 3)
    pe_t, pe_j = pe_pair(rng, 4, L)
    first, kv = tl.attention_kv(q, k, v, pe_t, n)
    first_j, kv_j = jl.attention_kv(qj, kj, vj, pe_j, n)
    allowed = torch.ones(L, L, dtype=torch.bool)
    allowed[-n:, :-n] = False  # the references' queries see only the references' keys
    q_rot, k_rot = tl.apply_rope(q, k, pe_t)
    masked = torch.nn.functional.scaled_dot_product_attention(q_rot, k_rot, v, attn_mask=allowed)
    assert rel_l2(out(first), out(masked.transpose(1, 2).reshape(2, L, H * HEAD))) < 1e-6
    assert (
        rel_l2(out(kv.k), out(k_rot[:, :, -n:])) == 0 and rel_l2(out(kv.v), out(v[:, :, -n:])) == 0
    )

    later, same = tl.attention_kv(q[:, :, :-n], k[:, :, :-n], v[:, :, :-n], pe_t[:, :, :-n], kv)
    later_j, same_j = jl.attention_kv(
        qj[:, :, :-n], kj[:, :, :-n], vj[:, :, :-n], pe_j[:, :, :-n], kv_j
    )
    assert same is kv and same_j is kv_j
    assert rel_l2(out(later), out(first[:, :-n])) < 1e-6
    for a, b in ((first_j, first), (later_j, later), (kv_j.k, kv.k), (kv_j.v, kv.v)):
        assert rel_l2(out(a), out(b)) < 1e-5


def block_twins(family, kind, dtype):
    params = configs.get(f"{family}-tiny")  # the family's MLP and biases
    flags = dict(bias=params.bias, gated_mlp=params.gated_mlp)
    if family == "flux1":
        cls = {
            "double": (t1.DoubleStreamBlock, j1.DoubleStreamBlock, (D, H, 4.0), {"qkv_bias": True}),
            "single": (t1.SingleStreamBlock, j1.SingleStreamBlock, (D, H, 4.0), {}),
        }[kind]
    else:
        cls = {
            "double": (
                t2.DoubleStreamBlock,
                j2.DoubleStreamBlock,
                (D, H, 3.0),
                {"qkv_bias": False},
            ),
            "single": (t2.SingleStreamBlock, j2.SingleStreamBlock, (D, H, 3.0), {}),
        }[kind]
    return twins(cls[0], cls[1], *cls[2], dtype=dtype, **cls[3], **flags)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_blocks(rng, family, dtype):
    li, lt = 12, 5
    (img, txt, vec), (img_j, txt_j, vec_j) = inputs(
        rng, (2, li, D), (2, lt, D), (2, D), dtype=dtype
    )
    n_axes = 3 if family == "flux1" else 4
    pe_t, pe_j = pe_pair(rng, n_axes, lt + li)
    for kind in ("double", "single"):
        t, j = block_twins(family, kind, dtype)
        if family == "flux1":
            targs, jargs = dict(vec=vec, pe=pe_t), dict(vec=vec_j, pe=pe_j)
        else:  # FLUX.2 blocks take their modulation from the model: make some
            mt_, mj_ = twins(tl.Modulation, jl.Modulation, D, kind == "double", False, dtype=dtype)
            mod_t, mod_j = mt_(vec), mj_(vec_j)
            if kind == "double":
                targs = dict(
                    pe=pe_t[:, :, lt:], pe_ctx=pe_t[:, :, :lt], mod_img=mod_t, mod_txt=mod_t
                )
                jargs = dict(
                    pe=pe_j[:, :, lt:], pe_ctx=pe_j[:, :, :lt], mod_img=mod_j, mod_txt=mod_j
                )
            else:
                targs, jargs = dict(pe=pe_t, mod=mod_t[0]), dict(pe=pe_j, mod=mod_j[0])
        with torch.no_grad():
            if kind == "double":
                ref = torch.cat(t(img, txt, **targs), 1)
                got = np.concatenate([out(a) for a in j(img_j, txt_j, **jargs)], 1)
            else:
                x, xj = torch.cat((txt, img), 1), np.concatenate([out(txt_j), out(img_j)], 1)
                ref = t(x, **targs)
                got = j(jnp.asarray(xj, img_j.dtype), **jargs)
        err = rel_l2(out(got), out(ref))
        assert err < BOUND[dtype], (family, kind, dtype, err)
