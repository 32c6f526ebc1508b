"""int8 GEMMs on tensor cores: ``mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32`` (sm_80 and newer).

:func:`schedule_int8_gemm` takes a fused PrimFunc whose one reduction block is an int8 x
int8 -> int32 "NT" matmul, ``C[..., i, j] += int32(A[..., i, k]) * int32(W[j, k])`` (the
activation rows ``A``, any number of leading spatial axes; the weight ``W`` ``[N, K]``,
row-major), followed by elementwise blocks (zero-point correction, cast, rescale, residual
add, as ``FuseOps`` + ``FuseTIR`` leave them), and returns it scheduled for the CUDA tensor
cores:

* the leading axes of ``A``/``C`` (batch, seq) are fused into one row axis ``M``
  (``reindex`` + ``transform_block_layout``, as dlight's Matmul rule normalises GEMMs), and
  a symbolic or ragged ``M`` is padded to the block-row size with ``pad_einsum``
  (predicated loads of ``A``, row-checked stores);
* block tile ``BM x BN`` (``BM`` = 64: 2 x 2 warps of 16 rows; ``BN`` = 16 x 2 warps x up to
  4 fragments, dividing ``N``), ``K`` in steps of ``BK`` = 32, 64 or 96 staged in dynamic
  shared memory with ``cp.async`` double buffering (``software_pipeline_async_stages``: the
  build must run under ``PassContext(config={"tirx.use_async_copy": True})``, see
  :data:`PASS_CONFIG`), fragments loaded with ``ldmatrix``;
* tensorized with TVM's registered intrinsics ``mma_ldmatrix_i8_a``/``_b_trans`` (from
  ``shared.dyn``: registered here with TVM's own generators), ``mma_i8i8i32_trans_b``,
  ``mma_fill_16x16_i32`` and a register -> ``shared.dyn`` store; the elementwise blocks after
  the GEMM are inlined into the vectorized shared -> global copy of the output tile, so the
  kernel writes the final (float) result once.

Shape restrictions: ``K % 32 == 0`` and ``N % 16 == 0`` (static); ``M`` anything,
symbolic included. A function that does not match (no such block, another layout,
other non-elementwise blocks, shapes outside the restrictions) gives ``None`` (with
the reason: :func:`why_not`), and the caller keeps its default (dp4a SIMT) schedule.

Verification: each intrinsic's description is checked against the block by
``tensorize`` when scheduling, and nvcc compiles the generated source for sm_80 and sm_90
to ``mma.sync ... .s8.s8`` (tests/backends/test_tvm_cuda.py). The numerics of the
scheduled kernels need a GPU run (the ``gpu``-marked test compares them with LLVM); none
was available when this was written.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import s_tir, tirx

from lowbit.backends.tvm import kernels

#: PassContext configuration the scheduled kernels need at build time (cp.async copies)
PASS_CONFIG = {"tirx.use_async_copy": True}
#: oldest architecture with the s8 ``m16n8k32`` mma
MIN_SM = 80

_LDMATRIX_A_DYN = "lowbit_mma_ldmatrix_i8_a_dyn"
_LDMATRIX_B_TRANS_DYN = "lowbit_mma_ldmatrix_i8_b_trans_dyn"
_STORE_I32_DYN = "lowbit_mma_store_16x16_i32_shared_dyn"
_BM = 64  # block rows: WM (2) warps x FM (2) fragments x 16
_WM, _FM = 2, 2
_WARP = 32


class NotApplicable(Exception):
    """The function is not an int8 NT GEMM this schedule takes (the message says why)."""


def _register_intrinsics() -> None:
    # importing the module registers TVM's own intrinsics (and takes a while: hundreds of them)
    from tvm.s_tir.tensor_intrin import cuda as ci

    for name, make in (
        (_LDMATRIX_A_DYN, lambda: ci.get_ldmatrix_intrin(32, "int8", "A", False, "shared.dyn")),
        (_LDMATRIX_B_TRANS_DYN, lambda: ci.get_ldmatrix_intrin(32, "int8", "B", True, "shared.dyn")),
        (_STORE_I32_DYN, lambda: ci.get_mma_store_intrin("int32", 8, "shared.dyn", False)),
    ):
        if s_tir.TensorIntrin.get(name, allow_missing=True) is None:
            s_tir.TensorIntrin.register(name, *make())


def supports(target: tvm.target.Target) -> bool:
    """A CUDA target of sm_80 or newer."""
    if target.kind.name != "cuda":
        return False
    arch = str(target.attrs.get("arch", ""))
    return arch.startswith("sm_") and arch[3:].rstrip("af").isdigit() and int(arch[3:].rstrip("af")) >= MIN_SM


# --------------------------------------------------------------------------------------
# Recognition
# --------------------------------------------------------------------------------------
def _root(sch: s_tir.Schedule):
    from tvm.s_tir.dlight.analysis import get_root_block

    return get_root_block(sch)


def _strip_cast(e, dtype: str):
    return e.value if isinstance(e, tirx.Cast) and str(e.ty) == dtype else None


def is_int8_gemm(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` has a reduction block reading two int8 buffers into an int32 one."""
    try:
        sch = s_tir.Schedule(func)
    except Exception:  # noqa: BLE001 - a function the schedule state rejects is no candidate either
        return False
    return any(kernels.is_int8_gemm_block(sch.get(b)) for b in sch.get_child_blocks(_root(sch)))


def match(func: tirx.PrimFunc) -> dict[str, Any]:
    """The int8 NT GEMM block of ``func`` and its shapes; :class:`NotApplicable` otherwise."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(_root(sch))
    reductions = []
    for b in blocks:
        kinds = {iv.iter_type for iv in sch.get(b).iter_vars}
        if kinds - {tirx.IterVar.DataPar, tirx.IterVar.CommReduce}:
            raise NotApplicable(f"block {sch.get(b).name_hint} has iterators that are neither spatial nor reduction")
        if tirx.IterVar.CommReduce in kinds:
            reductions.append(b)
    if len(reductions) != 1:
        raise NotApplicable(f"{len(reductions)} reduction blocks (need exactly one)")
    block = sch.get(reductions[0])
    store = block.body
    if not isinstance(store, tirx.BufferStore) or store.buffer.dtype != "int32" or block.init is None:
        raise NotApplicable("the reduction is not an int32 accumulation")
    value = store.value
    if not (isinstance(value, tirx.Add) and isinstance(value.a, tvm.ir.TensorLoad) and value.a.source.same_as(store.buffer)
            and isinstance(value.b, tirx.Mul)):
        raise NotApplicable("the reduction is not C = C + x * y")
    a, w = _strip_cast(value.b.a, "int32"), _strip_cast(value.b.b, "int32")
    if not (isinstance(a, tvm.ir.TensorLoad) and isinstance(w, tvm.ir.TensorLoad)
            and a.source.dtype == "int8" and w.source.dtype == "int8"):
        raise NotApplicable("the operands are not int8 loads cast to int32")
    reduce_vars = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if len(reduce_vars) != 1:
        raise NotApplicable("more than one reduction axis")
    k = reduce_vars[0]
    if len(w.indices) != 2 or not w.indices[1].same_as(k) or not isinstance(w.indices[0], tirx.Var):
        raise NotApplicable("no operand is a weight indexed [j, k]")
    j = w.indices[0]
    spatial = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    if not any(j.same_as(v) for v in spatial):
        raise NotApplicable("the weight's row index is not a spatial axis of the block")
    if not (a.indices and a.indices[-1].same_as(k) and store.indices and store.indices[-1].same_as(j)):
        raise NotApplicable("activation not indexed [..., i, k] or output not [..., i, j]")
    if any(_uses(idx, (j, k)) for idx in list(a.indices[:-1]) + list(store.indices[:-1])):
        raise NotApplicable("j or k index the activation rows or the output rows")
    if len(block.reads) != 2 or not (block.reads[0].source.same_as(a.source) and block.reads[1].source.same_as(w.source)):
        raise NotApplicable("the block does not read the activation, then the weight")
    n, kk = w.source.shape
    if not isinstance(n, tirx.IntImm) or not isinstance(kk, tirx.IntImm):
        raise NotApplicable("the weight shape is symbolic")
    ext_k, ext_j = (next(iv.dom.extent for iv in block.iter_vars if iv.var.same_as(v)) for v in (k, j))
    if not (isinstance(ext_k, tirx.IntImm) and ext_k.value == kk.value
            and isinstance(ext_j, tirx.IntImm) and ext_j.value == n.value):
        raise NotApplicable("the GEMM covers part of the weight")
    N, K = int(n.value), int(kk.value)
    if K % 32:
        raise NotApplicable(f"K = {K} is not a multiple of 32")
    if N % 16:
        raise NotApplicable(f"N = {N} is not a multiple of 16")
    return {"block": block.name_hint, "K": K, "N": N}


def _uses(expr, variables) -> bool:
    used = tirx.analysis.undefined_vars(expr)
    return any(u.same_as(v) for u in used for v in variables)


def why_not(func: tirx.PrimFunc) -> str | None:
    """None if :func:`schedule_int8_gemm` applies to ``func`` (by shape); else the reason."""
    try:
        match(func)
    except NotApplicable as e:
        return str(e)
    return None


# --------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------
def _pick(n: int, prefs: tuple[int, ...]) -> int:
    return next((p for p in prefs if n % p == 0), 1)


def _tiles(n: int, k: int) -> tuple[int, int, int]:
    """(warps along N, 16-column fragments per warp, 32-wide K slices per shared-memory stage)."""
    wn = _pick(n // 16, (2, 1))
    return wn, _pick(n // 16 // wn, (4, 3, 2, 1)), _pick(k // 32, (2, 3, 1))


def schedule_int8_gemm(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """``func`` with its int8 NT GEMM on tensor cores (epilogue fused), or None if it does not
    apply (see the module docstring). Errors of the schedule itself propagate."""
    try:
        info = match(func)
    except NotApplicable:
        return None
    return _schedule(func, info)


def _schedule(func: tirx.PrimFunc, info: dict[str, Any]) -> tirx.PrimFunc:
    from tvm.s_tir.dlight.gpu.matmul import (
        IterKind,
        auto_inline_consumer_chain,
        auto_inline_producers,
        detect_iter_traits,
        make_iter_fusion_index_map,
    )
    from tvm.s_tir.tensor_intrin import cuda as ci

    _register_intrinsics()
    N, K = info["N"], info["K"]
    sch = s_tir.Schedule(func)
    main = sch.get_sblock(info["block"])

    # 1. normalise to C[i, j] += A[i, k] * W[j, k]: the activation's leading axes fuse into i
    reindex_a = sch.reindex(main, ("read", 0))
    reindex_w = sch.reindex(main, ("read", 1))
    reindex_c = sch.reindex(main, ("write", 0))
    traits = detect_iter_traits(sch.get(main))
    if traits is None:
        raise NotApplicable("not a GEMM after reindexing")
    a_traits, b_traits, c_traits, block_traits = traits
    if any(t.kind == IterKind.kIter_S for t in block_traits):
        raise NotApplicable("batched GEMM (an axis shared by both operands)")
    kI, kJ, kK = IterKind.kIter_I, IterKind.kIter_J, IterKind.kIter_K
    sch.transform_layout(reindex_a, ("write", 0), make_iter_fusion_index_map(a_traits, [kI, kK]))
    sch.transform_layout(reindex_w, ("write", 0), make_iter_fusion_index_map(b_traits, [kJ, kK]))
    sch.transform_layout(reindex_c, ("read", 0), make_iter_fusion_index_map(c_traits, [kI, kJ]))
    sch.transform_block_layout(main, make_iter_fusion_index_map(block_traits, [kI, kJ, kK]))

    # 2. tile sizes
    m = sch.get(main).iter_vars[0].dom.extent
    wn, fn, ki = _tiles(N, K)
    padded = not (isinstance(m, tirx.IntImm) and m.value % _BM == 0)
    if padded:
        sch.pad_einsum(main, [_BM, 16, 32])

    # 3. tiles of 16 x 16 x 32 (one mma each), blocks of BM x BN, warps of 32 x (16 fn)
    i, j, k = sch.get_loops(main)
    i, i_tc = sch.split(i, factors=[None, 16])
    j, j_tc = sch.split(j, factors=[None, 16])
    k, k_tc = sch.split(k, factors=[None, 32])
    sch.reorder(i, j, k, i_tc, j_tc, k_tc)
    block_outer = sch.blockize(i_tc)
    block_inner = main
    i0, i2, i3 = sch.split(i, factors=[None, _WM, _FM])
    j0, j2, j3 = sch.split(j, factors=[None, wn, fn])
    k0, k1 = sch.split(k, factors=[None, ki])
    sch.reorder(i0, j0, i2, j2, k0, k1, i3, j3)
    bx = sch.fuse(i0, j0)
    ty = sch.fuse(i2, j2)
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    num_ty = _WM * wn

    # 4. global -> shared.dyn, 16-byte vectors (4 where rows are predicated: TVM's CUDA codegen
    #    cannot zero-fill an int8 x16 vector), rows padded against bank conflicts
    def fetch_to_shared(idx: int, vec: int):
        rd = sch.cache_read(block_outer, idx, "shared.dyn")
        sch.compute_at(rd, k0)
        fused = sch.fuse(*sch.get_loops(rd)[-2:])
        _, f1, f2, f3 = sch.split(fused, factors=[None, num_ty, _WARP, vec])
        sch.bind(f2, "threadIdx.x")
        sch.bind(f1, "threadIdx.y")
        sch.vectorize(f3)
        sch.storage_align(rd, 0, axis=-2, factor=32, offset=16)
        return rd

    a_s = fetch_to_shared(0, 4 if padded else 16)
    b_s = fetch_to_shared(1, 16)
    auto_inline_producers(sch, a_s)  # the reindex (and pad) blocks read global memory directly
    auto_inline_producers(sch, b_s)

    # 5. shared -> registers (ldmatrix), accumulators -> shared.dyn -> epilogue -> global
    a_w = sch.cache_read(block_outer, 0, "warp")
    b_w = sch.cache_read(block_outer, 1, "warp")
    sch.compute_at(a_w, k1)
    sch.compute_at(b_w, k1)
    c_s = sch.cache_write(block_outer, 0, "shared.dyn")
    sch.storage_align(c_s, 0, axis=-2, factor=32, offset=4)
    c_w = sch.cache_write(block_outer, 0, "warp")
    sch.reverse_compute_at(c_w, ty)
    ii, jj = sch.get_loops(c_w)[-2:]
    io, ii = sch.split(ii, factors=[None, 16])
    jo, ji = sch.split(jj, factors=[None, 16])
    sch.reorder(io, jo, ii, ji)
    sch.reverse_compute_at(c_s, ty)
    auto_inline_consumer_chain(sch, c_s)  # the C slice, the reindex and the elementwise epilogue
    fused = sch.fuse(*sch.get_loops(c_s)[-2:])
    _, f1, f2 = sch.split(fused, factors=[None, _WARP, 4])
    sch.bind(f1, "threadIdx.x")
    sch.vectorize(f2)

    init = sch.decompose_reduction(block_outer, k0)

    def tile_fragment(rd, h: int, w: int):
        a, b = sch.get_loops(rd)[-2:]
        a0, a1 = sch.split(a, factors=[None, h])
        b0, b1 = sch.split(b, factors=[None, w])
        sch.reorder(a0, b0, a1, b1)
        return a1

    loop_a = tile_fragment(a_w, 16, 32)
    loop_b = tile_fragment(b_w, 16, 32)
    sch.transform_layout(a_w, ("write", 0),
                         lambda i, k: (i // 16, k // 32, *ci.shared_16x32_to_ldmatrix_32x16_layout(i % 16, k % 32)))
    sch.transform_layout(b_w, ("write", 0),
                         lambda j, k: (j // 16, k // 32, *ci.shared_16x32_to_ldmatrix_32x16_layout(j % 16, k % 32)))
    sch.transform_layout(c_w, ("read", 0),
                         lambda i, j: (i // 16, j // 16, *ci.shared_16x16_to_ldmatrix_32x8_layout(i % 16, j % 16)))

    # 6. tensorize
    sch.tensorize(loop_a, _LDMATRIX_A_DYN)
    sch.tensorize(loop_b, _LDMATRIX_B_TRANS_DYN)
    sch.tensorize(sch.get_loops(block_inner)[-3], ci.MMA_i8i8i32_TRANS_B_INTRIN)
    children = sch.get_child_blocks(init)
    sch.tensorize(sch.get_loops(children[0] if children else init)[-2], ci.MMA_fill_16x16_i32_INTRIN)
    sch.tensorize(sch.get_loops(c_w)[-2], _STORE_I32_DYN)

    # 7. k0 body = [A global->shared, W global->shared, k1 loop]: double-buffered, cp.async copies
    sch.annotate(k0, "software_pipeline_stage", [0, 0, 1])
    sch.annotate(k0, "software_pipeline_order", [0, 1, 2])
    sch.annotate(k0, "software_pipeline_async_stages", [0])
    return sch.mod["main"]

