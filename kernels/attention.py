"""Fused attention (FlashAttention-2 algorithm) in Triton, tuned for short ViT sequences; non-causal, or
block-causal (V-JEPA 2-AC's frame-causal mask: query i sees key j iff j // FRAME <= i // FRAME).

Layout is [B, H, N, D] with arbitrary strides. Forward: online softmax over key blocks, fp32 accumulation,
saves the natural-log log-sum-exp (LSE) per query row. Backward: one kernel walks key blocks for each
query block (dQ; it also computes delta = rowsum(dO * O), the preprocess of FlashAttention-2), then another
walks query blocks for each key block (dK, dV), so nothing needs atomics. Exponentials use exp2 with
the scale folded into log2(e).

Shapes handled without caller padding: any Nq and Nk (tails masked), head dims up to 256, optional per-sample
key lengths (keys at index >= key_lengths[b] are ignored; a row with no keys gives zeros and zero gradients).

Block-causal mode (CAUSAL, a constexpr, so the non-causal kernels carry none of its code): each row's
visible keys are a prefix, so the loops stop at the last visible key tile (fully masked tiles are never
loaded), run unmasked over the tiles every row of the program sees, and mask only the tiles in between; the
dK/dV kernel likewise starts at the first query tile that sees its keys. FRAME = 1 is ordinary causal attention.

Head dims: Triton tiles are powers of two, so a head dim D is covered either by one tile padded to the next
power of two, or split in two tiles (the largest power of two <= D, plus the remainder rounded up to a power of
two of at least 16) whose dots are summed. The split does the same arithmetic on fewer padded columns: D = 80
(ViT-H/14) is 64 + 16 instead of 128, i.e. 37.5% fewer MMA FLOPs and accumulator registers; 40 and 48 are
32 + 16 instead of 64, 96 is 64 + 32 instead of 128 (kernels/attention_tiles.py: head_dim_tiles).

Short tail (TAIL16, on by default): the streamed dimension's last, partial tile (keys for the forward and dQ,
queries for dK/dV) is walked in 16-row tiles instead of one full one. At N = 196/197 with 64 x 64 tiles the
full tail makes 41% of the score matrix's MMA and exp work padding (256 x 256 computed for 197 x 197); 16-row
tail tiles bring that to 28% (256 x 208). Block-causal forward and dQ keep full tiles (their masked span can
cross a frame).

Tiles: small ones (32/64 rows) are in the spaces because at N <= 256 a 128-row tile leaves most of its rows
masked (196 tokens = 1.53 tiles of 128), and head dims 24..80 make each tile's dots cheap, so more, smaller
programs keep an H100's SMs busy. The autotune key is (power-of-two bucket of Nq, of Nk, head dim, tiling,
causal, tail) plus the dtypes (Triton adds those), so the predictor's varying sequence lengths do not retune
every step; results are cached on disk (Triton's cache_results). The spaces, the pinned tiles that skip the
autotuner (tests, quick runs, the interpreter) and the switches: kernels/attention_tiles.py.
"""
import torch
import triton
import triton.language as tl

from .attention_tiles import BLOCK_NAMES, configs, head_dim_tiles, interpreting, prune, tail16_enabled, tile_choice

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(x) = log2(x) * LN2
TAIL_ROWS = tl.constexpr(16)  # rows of the short tail tile (the smallest a tensor-core dot takes)


def _interpreting():
    return interpreting()


def _fix_interpreter_scalar_index():
    """Let the interpreter use runtime scalars as ``range`` bounds under NumPy >= 2.3.

    Triton 3.6's interpreter keeps scalars as 1-element arrays of shape (1,) and converts them with
    ``int(array)``, which NumPy 2.3+ rejects, so any loop with a runtime trip count fails. This wraps the
    interpreter's tensor patching to convert through ``.item()``. Process-wide and idempotent; it only
    changes the interpreter (the GPU compiler never sees ``__index__``).
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_scalar_index_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_index_fixed = True
    interpreter._patch_lang_tensor = patched


if _interpreting():
    _fix_interpreter_scalar_index()


def _bucket(n):
    return triton.next_power_of_2(max(int(n), 16))


# BLOCK_D tells the padded and split tilings of one head dim apart, so each gets its own tuned tiles.
_TUNE_KEY = ["N_Q_KEY", "N_K_KEY", "HEAD_DIM", "BLOCK_D", "CAUSAL", "TAIL16"]


# ---------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, offs_r, offs_d, stride_r, stride_d, n_rows,
               HEAD_DIM: tl.constexpr, COL_END: tl.constexpr, MASK_ROWS: tl.constexpr, ALIGN: tl.constexpr):
    """Load the columns offs_d (ending at COL_END) of rows offs_r; columns >= HEAD_DIM and (if MASK_ROWS) rows
    >= n_rows read 0."""
    ptrs = base + tl.multiple_of(offs_r * stride_r, ALIGN)[:, None] + offs_d[None, :] * stride_d
    if MASK_ROWS:
        if COL_END <= HEAD_DIM:
            tile = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if COL_END <= HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _load_tile(base, offs_r, stride_r, stride_d, n_rows, ROWS: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr,
               MASK_ROWS: tl.constexpr, ALIGN: tl.constexpr):
    """Rows offs_r as two column tiles: [ROWS, BLOCK_D] and, if SPLIT, the next [ROWS, BLOCK_D2]. Without a
    split the second is a zero placeholder that no dot reads (the compiler drops it)."""
    a = _load_rows(base, offs_r, tl.arange(0, BLOCK_D), stride_r, stride_d, n_rows, HEAD_DIM, BLOCK_D, MASK_ROWS,
                   ALIGN)
    if SPLIT:
        b = _load_rows(base, offs_r, BLOCK_D + tl.arange(0, BLOCK_D2), stride_r, stride_d, n_rows, HEAD_DIM,
                       BLOCK_D + BLOCK_D2, MASK_ROWS, ALIGN)
    else:
        b = tl.zeros([ROWS, BLOCK_D2], dtype=base.dtype.element_ty)
    return a, b


@triton.jit
def _store_rows(base, tile, offs_r, offs_d, stride_r, stride_d, n_rows,
                HEAD_DIM: tl.constexpr, COL_END: tl.constexpr, ALIGN: tl.constexpr):
    ptrs = base + tl.multiple_of(offs_r * stride_r, ALIGN)[:, None] + offs_d[None, :] * stride_d
    if COL_END <= HEAD_DIM:
        tl.store(ptrs, tile, mask=offs_r[:, None] < n_rows)
    else:
        tl.store(ptrs, tile, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _store_tile(base, a, b, offs_r, stride_r, stride_d, n_rows,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr,
                ALIGN: tl.constexpr):
    dtype = base.dtype.element_ty
    _store_rows(base, a.to(dtype), offs_r, tl.arange(0, BLOCK_D), stride_r, stride_d, n_rows, HEAD_DIM, BLOCK_D,
                ALIGN)
    if SPLIT:
        _store_rows(base, b.to(dtype), offs_r, BLOCK_D + tl.arange(0, BLOCK_D2), stride_r, stride_d, n_rows,
                    HEAD_DIM, BLOCK_D + BLOCK_D2, ALIGN)


@triton.jit
def _dot_nt(x_a, x_b, y_a, y_b, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """x @ y^T over the head dim, summed over both column tiles: [rows of x, rows of y] in fp32."""
    acc = tl.dot(x_a, tl.trans(y_a), input_precision=PRECISION)
    if SPLIT:
        acc = tl.dot(x_b, tl.trans(y_b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _dot_acc(p, y_a, y_b, acc_a, acc_b, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """(acc_a, acc_b) += p @ (y_a, y_b), with p cast to y's dtype as FlashAttention-2 does."""
    p = p.to(y_a.dtype)
    acc_a = tl.dot(p, y_a, acc_a, input_precision=PRECISION)
    if SPLIT:
        acc_b = tl.dot(p, y_b, acc_b, input_precision=PRECISION)
    return acc_a, acc_b


@triton.jit
def _head(ptr, b64, h64, stride_b, stride_h, ALIGN: tl.constexpr):
    """Pointer to the [N, D] matrix of (batch, head); ALIGN (host-checked) lets loads vectorize when the
    row strides are multiples of 8 but not of 16 elements (D = 24, 40), which Triton cannot infer."""
    return ptr + tl.multiple_of(b64 * stride_b + h64 * stride_h, ALIGN)


@triton.jit
def _tile_of_head(n_rows, BLOCK: tl.constexpr, H):
    """(row tile, batch*head, batch, head) of this program. The tiles of one (batch, head) are adjacent in
    launch order so they share the other operand in L2; a flat grid avoids the 65535 limit on grid axis 1."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_rows, BLOCK)
    bh = pid // n_tiles
    return pid % n_tiles, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _key_length(KL, b, N_K, HAS_KL: tl.constexpr):
    if HAS_KL:
        kv_len = tl.minimum(tl.maximum(tl.load(KL + b).to(tl.int32), 0), N_K)
    else:
        kv_len = N_K
    return kv_len


@triton.jit
def _causal_key_limits(pid_m, offs_m, kv_len, N_Q, FRAME, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """(per-row end of visible keys, min over the tile's rows, max over them). Block-causal with FRAME tokens
    per block: query i sees key j iff j // FRAME <= i // FRAME (and j < kv_len). Non-causal: all kv_len."""
    if CAUSAL:
        lim = tl.minimum((offs_m // FRAME + 1) * FRAME, kv_len)
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, N_Q) - 1
        lo = tl.minimum(((pid_m * BLOCK_M) // FRAME + 1) * FRAME, kv_len)
        hi = tl.minimum((last // FRAME + 1) * FRAME, kv_len)
    else:
        lim = kv_len
        lo = kv_len
        hi = kv_len
    return lim, lo, hi


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_block(q_a, q_b, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start_n, kv_len, lim, qk_scale,
               m_i, l_i, acc_a, acc_b,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
               CAUSAL: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    k_a, k_b = _load_tile(k_base, cols, stride_kn, stride_kd, kv_len, BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT,
                          MASK_N, ALIGN)
    v_a, v_b = _load_tile(v_base, cols, stride_vn, stride_vd, kv_len, BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT,
                          MASK_N, ALIGN)
    s = _dot_nt(q_a, q_b, k_a, k_b, SPLIT, PRECISION) * qk_scale
    if MASK_N:
        if CAUSAL:  # lim: each row's own end of visible keys
            s = tl.where(cols[None, :] < lim[:, None], s, float("-inf"))
        else:
            s = tl.where(cols[None, :] < kv_len, s, float("-inf"))
    # Every processed block holds at least one valid key, so m_new is finite and alpha never NaN. Block-causal:
    # a row may see no key of a later block, but every row saw key 0 in the first block, so m_i is finite.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc_a = acc_a * alpha[:, None]
    if SPLIT:
        acc_b = acc_b * alpha[:, None]
    acc_a, acc_b = _dot_acc(p, v_a, v_b, acc_a, acc_b, SPLIT, PRECISION)
    return m_new, l_i, acc_a, acc_b


@triton.autotune(configs=configs("fwd"), key=_TUNE_KEY, cache_results=True,
                 prune_configs_by={"early_config_prune": prune("fwd")})
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, KL,
                     stride_qb, stride_qh, stride_qn, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_ob, stride_oh, stride_on, stride_od,
                     H, N_Q, N_K, sm_scale, N_Q_KEY, N_K_KEY, FRAME,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr,
                     HAS_KL: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr, CAUSAL: tl.constexpr,
                     TAIL16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh, b64, h64 = _tile_of_head(N_Q, BLOCK_M, H)
    q_base = _head(Q, b64, h64, stride_qb, stride_qh, ALIGN)
    k_base = _head(K, b64, h64, stride_kb, stride_kh, ALIGN)
    v_base = _head(V, b64, h64, stride_vb, stride_vh, ALIGN)
    o_base = _head(O, b64, h64, stride_ob, stride_oh, ALIGN)
    kv_len = _key_length(KL, b64, N_K, HAS_KL)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_a, q_b = _load_tile(q_base, offs_m, stride_qn, stride_qd, N_Q, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT,
                          True, ALIGN)
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    # Keys below lo are visible to every row of the tile (no mask); keys in [lo, hi) to some rows (masked);
    # key tiles at or past hi are visible to none and never loaded.
    lim, lo, hi = _causal_key_limits(pid_m, offs_m, kv_len, N_Q, FRAME, BLOCK_M, CAUSAL)
    n_full = (lo // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc_a, acc_b = _fwd_block(q_a, q_b, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                            start_n, kv_len, lim, qk_scale, m_i, l_i, acc_a, acc_b,
                                            HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N, False, PRECISION, ALIGN,
                                            CAUSAL)
    if TAIL16 and not CAUSAL:  # the < BLOCK_N keys past the last full tile, in 16-row steps
        for start_n in range(n_full, hi, TAIL_ROWS):
            m_i, l_i, acc_a, acc_b = _fwd_block(q_a, q_b, k_base, v_base, stride_kn, stride_kd, stride_vn,
                                                stride_vd, start_n, kv_len, lim, qk_scale, m_i, l_i, acc_a, acc_b,
                                                HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, TAIL_ROWS, True, PRECISION,
                                                ALIGN, CAUSAL)
    else:  # non-causal: at most one masked tail block
        for start_n in range(n_full, hi, BLOCK_N):
            m_i, l_i, acc_a, acc_b = _fwd_block(q_a, q_b, k_base, v_base, stride_kn, stride_kd, stride_vn,
                                                stride_vd, start_n, kv_len, lim, qk_scale, m_i, l_i, acc_a, acc_b,
                                                HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N, True, PRECISION, ALIGN,
                                                CAUSAL)

    # A row with no keys (kv_len == 0) has l_i == 0: output zeros and LSE = +inf, which makes the
    # backward's probabilities exp(s - inf) = 0, hence zero gradients instead of NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    _store_tile(o_base, acc_a / l_safe[:, None], acc_b / l_safe[:, None], offs_m, stride_on, stride_od, N_Q,
                HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, ALIGN)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


# ---------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_block(k_a, k_b, v_a, v_b, dk_a, dk_b, dv_a, dv_b, q_base, do_base, lse_base, delta_base,
                stride_qn, stride_qd, stride_don, stride_dod, start_m, N_Q, qk_scale, key_valid, first_query,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr,
                BLOCK_M: tl.constexpr, MASK_M: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
                CAUSAL_M: tl.constexpr):
    rows = start_m + tl.arange(0, BLOCK_M)
    q_a, q_b = _load_tile(q_base, rows, stride_qn, stride_qd, N_Q, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT,
                          MASK_M, ALIGN)
    do_a, do_b = _load_tile(do_base, rows, stride_don, stride_dod, N_Q, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT,
                            MASK_M, ALIGN)
    if MASK_M:
        # Padded query rows get LSE = +inf, so their probabilities (and contributions) are exactly 0.
        lse = tl.load(lse_base + rows, mask=rows < N_Q, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < N_Q, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    s_t = _dot_nt(k_a, k_b, q_a, q_b, SPLIT, PRECISION)
    p_t = tl.exp2(s_t * qk_scale - (lse * LOG2E)[None, :])
    if CAUSAL_M:  # first_query: the first query row that sees each key
        p_t = tl.where(key_valid[:, None] & (rows[None, :] >= first_query[:, None]), p_t, 0.0)
    else:
        p_t = tl.where(key_valid[:, None], p_t, 0.0)
    dv_a, dv_b = _dot_acc(p_t, do_a, do_b, dv_a, dv_b, SPLIT, PRECISION)
    dp_t = _dot_nt(v_a, v_b, do_a, do_b, SPLIT, PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk_a, dk_b = _dot_acc(ds_t, q_a, q_b, dk_a, dk_b, SPLIT, PRECISION)
    return dk_a, dk_b, dv_a, dv_b


@triton.autotune(configs=configs("dkdv"), key=_TUNE_KEY, cache_results=True,
                 prune_configs_by={"early_config_prune": prune("dkdv")})
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KL,
                          stride_qb, stride_qh, stride_qn, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_dob, stride_doh, stride_don, stride_dod,
                          stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                          H, N_Q, N_K, sm_scale, N_Q_KEY, N_K_KEY, FRAME,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                          SPLIT: tl.constexpr, HAS_KL: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
                          CAUSAL: tl.constexpr, TAIL16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n, bh, b64, h64 = _tile_of_head(N_K, BLOCK_N, H)
    kv_len = _key_length(KL, b64, N_K, HAS_KL)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_a, k_b = _load_tile(_head(K, b64, h64, stride_kb, stride_kh, ALIGN), offs_n, stride_kn, stride_kd, N_K,
                          BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, True, ALIGN)
    v_a, v_b = _load_tile(_head(V, b64, h64, stride_vb, stride_vh, ALIGN), offs_n, stride_vn, stride_vd, N_K,
                          BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, True, ALIGN)
    key_valid = offs_n < kv_len
    q_base = _head(Q, b64, h64, stride_qb, stride_qh, ALIGN)
    do_base = _head(DO, b64, h64, stride_dob, stride_doh, ALIGN)
    lse_base = LSE + bh.to(tl.int64) * N_Q
    delta_base = DELTA + bh.to(tl.int64) * N_Q
    qk_scale = sm_scale * LOG2E

    dk_a = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk_b = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_b = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
    # A key block lying wholly in the padding gets no queries: its dK and dV stay zero.
    q_stop = tl.where(pid_n * BLOCK_N < kv_len, N_Q, 0)
    m_full = (q_stop // BLOCK_M) * BLOCK_M
    if CAUSAL:
        # Query tiles before the key tile's first block see none of its keys and are skipped; those before
        # the block of its last valid key see only some of them (masked); the rest see all of them.
        first_query = (offs_n // FRAME) * FRAME
        last_key = tl.minimum(pid_n * BLOCK_N + BLOCK_N, kv_len) - 1
        m_begin = (((pid_n * BLOCK_N) // FRAME) * FRAME // BLOCK_M) * BLOCK_M
        m_open = tl.cdiv((tl.maximum(last_key, 0) // FRAME) * FRAME, BLOCK_M) * BLOCK_M
        for start_m in range(m_begin, tl.minimum(m_open, q_stop), BLOCK_M):
            dk_a, dk_b, dv_a, dv_b = _dkdv_block(k_a, k_b, v_a, v_b, dk_a, dk_b, dv_a, dv_b, q_base, do_base,
                                                 lse_base, delta_base, stride_qn, stride_qd, stride_don, stride_dod,
                                                 start_m, N_Q, qk_scale, key_valid, first_query, HEAD_DIM,
                                                 BLOCK_D, BLOCK_D2, SPLIT, BLOCK_M, True, PRECISION, ALIGN, True)
        m_rest = tl.maximum(m_open, m_begin)
    else:
        first_query = offs_n
        m_rest = 0
    for start_m in range(m_rest, m_full, BLOCK_M):
        dk_a, dk_b, dv_a, dv_b = _dkdv_block(k_a, k_b, v_a, v_b, dk_a, dk_b, dv_a, dv_b, q_base, do_base, lse_base,
                                             delta_base, stride_qn, stride_qd, stride_don, stride_dod, start_m, N_Q,
                                             qk_scale, key_valid, first_query, HEAD_DIM, BLOCK_D, BLOCK_D2,
                                             SPLIT, BLOCK_M, False, PRECISION, ALIGN, False)
    # The query tail (fewer than BLOCK_M rows, past the causal region): in 16-row steps, or one masked tile.
    if TAIL16:
        for start_m in range(tl.maximum(m_full, m_rest), q_stop, TAIL_ROWS):
            dk_a, dk_b, dv_a, dv_b = _dkdv_block(k_a, k_b, v_a, v_b, dk_a, dk_b, dv_a, dv_b, q_base, do_base,
                                                 lse_base, delta_base, stride_qn, stride_qd, stride_don, stride_dod,
                                                 start_m, N_Q, qk_scale, key_valid, first_query, HEAD_DIM, BLOCK_D,
                                                 BLOCK_D2, SPLIT, TAIL_ROWS, True, PRECISION, ALIGN, False)
    else:
        for start_m in range(tl.maximum(m_full, m_rest), q_stop, BLOCK_M):
            dk_a, dk_b, dv_a, dv_b = _dkdv_block(k_a, k_b, v_a, v_b, dk_a, dk_b, dv_a, dv_b, q_base, do_base,
                                                 lse_base, delta_base, stride_qn, stride_qd, stride_don, stride_dod,
                                                 start_m, N_Q, qk_scale, key_valid, first_query, HEAD_DIM, BLOCK_D,
                                                 BLOCK_D2, SPLIT, BLOCK_M, True, PRECISION, ALIGN, False)
    _store_tile(_head(DK, b64, h64, stride_dkb, stride_dkh, ALIGN), dk_a * sm_scale, dk_b * sm_scale, offs_n,
                stride_dkn, stride_dkd, N_K, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, ALIGN)
    _store_tile(_head(DV, b64, h64, stride_dvb, stride_dvh, ALIGN), dv_a, dv_b, offs_n,
                stride_dvn, stride_dvd, N_K, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, ALIGN)


@triton.jit
def _dq_block(q_a, q_b, do_a, do_b, lse2, delta, dq_a, dq_b, k_base, v_base, stride_kn, stride_kd, stride_vn,
              stride_vd, start_n, kv_len, lim, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr,
              CAUSAL: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    k_a, k_b = _load_tile(k_base, cols, stride_kn, stride_kd, kv_len, BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT,
                          MASK_N, ALIGN)
    v_a, v_b = _load_tile(v_base, cols, stride_vn, stride_vd, kv_len, BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT,
                          MASK_N, ALIGN)
    s = _dot_nt(q_a, q_b, k_a, k_b, SPLIT, PRECISION)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASK_N:
        # Keys past kv_len were loaded as zero rows: their score 0 gives p = exp2(-lse2), which overflows when
        # every real logit is far below 0 (about -89 in fp32), and then ds = inf * 0 = NaN. So they are masked;
        # block-causal, so are the real keys a row does not see.
        if CAUSAL:
            p = tl.where(cols[None, :] < lim[:, None], p, 0.0)
        else:
            p = tl.where(cols[None, :] < kv_len, p, 0.0)
    dp = _dot_nt(do_a, do_b, v_a, v_b, SPLIT, PRECISION)
    ds = p * (dp - delta[:, None])
    return _dot_acc(ds, k_a, k_b, dq_a, dq_b, SPLIT, PRECISION)


@triton.autotune(configs=configs("dq"), key=_TUNE_KEY, cache_results=True,
                 prune_configs_by={"early_config_prune": prune("dq")})
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, KL,
                        stride_qb, stride_qh, stride_qn, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_ob, stride_oh, stride_on, stride_od,
                        stride_dob, stride_doh, stride_don, stride_dod,
                        stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                        H, N_Q, N_K, sm_scale, N_Q_KEY, N_K_KEY, FRAME,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr,
                        HAS_KL: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr, CAUSAL: tl.constexpr,
                        TAIL16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh, b64, h64 = _tile_of_head(N_Q, BLOCK_M, H)
    kv_len = _key_length(KL, b64, N_K, HAS_KL)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_a, q_b = _load_tile(_head(Q, b64, h64, stride_qb, stride_qh, ALIGN), offs_m, stride_qn, stride_qd, N_Q,
                          BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, True, ALIGN)
    do_a, do_b = _load_tile(_head(DO, b64, h64, stride_dob, stride_doh, ALIGN), offs_m, stride_don, stride_dod, N_Q,
                            BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, True, ALIGN)
    row_ok = offs_m < N_Q
    lse2 = tl.load(LSE + bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    # delta = rowsum(dO * O), the softmax-backward correction. This kernel runs first and already holds dO,
    # so it computes delta here (saving a launch and a pass over dO) and stores it for the dK/dV kernel.
    o_a, o_b = _load_tile(_head(O, b64, h64, stride_ob, stride_oh, ALIGN), offs_m, stride_on, stride_od, N_Q,
                          BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, True, ALIGN)
    delta = tl.sum(o_a.to(tl.float32) * do_a.to(tl.float32), 1)
    if SPLIT:
        delta += tl.sum(o_b.to(tl.float32) * do_b.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=row_ok)
    k_base = _head(K, b64, h64, stride_kb, stride_kh, ALIGN)
    v_base = _head(V, b64, h64, stride_vb, stride_vh, ALIGN)
    qk_scale = sm_scale * LOG2E

    dq_a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq_b = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    lim, lo, hi = _causal_key_limits(pid_m, offs_m, kv_len, N_Q, FRAME, BLOCK_M, CAUSAL)
    n_full = (lo // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq_a, dq_b = _dq_block(q_a, q_b, do_a, do_b, lse2, delta, dq_a, dq_b, k_base, v_base, stride_kn, stride_kd,
                               stride_vn, stride_vd, start_n, kv_len, lim, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N, False, PRECISION, ALIGN, CAUSAL)
    if TAIL16 and not CAUSAL:
        for start_n in range(n_full, hi, TAIL_ROWS):
            dq_a, dq_b = _dq_block(q_a, q_b, do_a, do_b, lse2, delta, dq_a, dq_b, k_base, v_base, stride_kn,
                                   stride_kd, stride_vn, stride_vd, start_n, kv_len, lim, qk_scale,
                                   HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, TAIL_ROWS, True, PRECISION, ALIGN, CAUSAL)
    else:
        for start_n in range(n_full, hi, BLOCK_N):
            dq_a, dq_b = _dq_block(q_a, q_b, do_a, do_b, lse2, delta, dq_a, dq_b, k_base, v_base, stride_kn,
                                   stride_kd, stride_vn, stride_vd, start_n, kv_len, lim, qk_scale,
                                   HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, BLOCK_N, True, PRECISION, ALIGN, CAUSAL)
    _store_tile(_head(DQ, b64, h64, stride_dqb, stride_dqh, ALIGN), dq_a * sm_scale, dq_b * sm_scale, offs_m,
                stride_dqn, stride_dqd, N_Q, HEAD_DIM, BLOCK_D, BLOCK_D2, SPLIT, ALIGN)


# ---------------------------------------------------------------------------------------------------------
# Host functions: check inputs and launch
# ---------------------------------------------------------------------------------------------------------
def _launch_params(q):
    """The kernels' head-dim and precision constexprs for q [.., D], and the tail switch."""
    d = q.shape[-1]
    block_d, block_d2, split = head_dim_tiles(d)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_D2=block_d2, SPLIT=split, PRECISION=precision,
                TAIL16=tail16_enabled())


def _launch(kernel, name, grid, args, params):
    """Launch ``kernel`` with the autotuner, or (pinned tiles, see kernels/attention_tiles.py) without it."""
    tiles = tile_choice(name, params["BLOCK_D"] + (params["BLOCK_D2"] if params["SPLIT"] else 0))
    if tiles is None:
        kernel[grid](*args, **params)
        return
    own, streamed, warps, stages = tiles
    own_name, streamed_name = BLOCK_NAMES[name]
    kernel.fn[grid](*args, **params, **{own_name: own, streamed_name: streamed}, num_warps=warps,
                    num_stages=stages)


def _row_align(*tensors):
    """Largest power of two (<= 16) dividing every batch/head/row stride, in elements (1 if any head dim is
    strided, where nothing vectorizes anyway). The kernels pass it to tl.multiple_of."""
    align = 16
    for t in tensors:
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            return 1
        for s in t.stride()[:-1]:
            while align > 1 and s % align:
                align //= 2
    return align


def _kl_arg(key_lengths):
    if key_lengths is None:
        return None, False
    return key_lengths.contiguous(), True


def _causal_args(block_causal):
    """(FRAME, CAUSAL) kernel arguments: block_causal = tokens per block (frame), 0 or None = non-causal."""
    return (int(block_causal), True) if block_causal else (1, False)


def attention_forward(q, k, v, scale=None, key_lengths=None, block_causal=0):
    """Returns (out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] float32, natural log; +inf for rows with no keys).

    The output is laid out as [B, Nq, H, D] in memory (a permuted view), so the usual
    ``out.transpose(1, 2).reshape(B, N, H * D)`` before the projection is free.
    """
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    params = _launch_params(q)
    out = torch.empty((B, Nq, H, params["HEAD_DIM"]), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("inf") if Nk == 0 else 0.0)
        return out.zero_(), lse
    kl, has_kl = _kl_arg(key_lengths)
    frame, causal = _causal_args(block_causal)
    params.update(HAS_KL=has_kl, ALIGN=_row_align(q, k, v, out), CAUSAL=causal)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    args = (q, k, v, out, lse, kl, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, Nq, Nk, scale, _bucket(Nq), _bucket(Nk), frame)
    _launch(_attn_fwd_kernel, "fwd", grid, args, params)
    return out, lse


def attention_backward(do, q, k, v, out, lse, scale=None, key_lengths=None, block_causal=0, grads=None):
    """Returns (dq, dk, dv), each with the shape and dtype of its input; written into ``grads`` = (dq, dk, dv)
    when given (views into one packed buffer, say: see ``iwm_fast.ops.attention.attention_qkv``)."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    params = _launch_params(q)
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    kl, has_kl = _kl_arg(key_lengths)
    frame, causal = _causal_args(block_causal)
    params.update(HAS_KL=has_kl, ALIGN=_row_align(q, k, v, out, do, dq, dk, dv), CAUSAL=causal)
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    sizes = (H, Nq, Nk, scale, _bucket(Nq), _bucket(Nk), frame)
    # dQ first: it also writes delta, which the dK/dV kernel reads.
    grid_q = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    _launch(_attn_bwd_dq_kernel, "dq", grid_q, (q, k, v, out, do, lse, delta, dq, kl, *q.stride(), *k.stride(),
                                                *v.stride(), *out.stride(), *do.stride(), *dq.stride(), *sizes),
            params)
    grid_kv = lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]) * B * H,)  # noqa: E731
    _launch(_attn_bwd_dkdv_kernel, "dkdv", grid_kv, (q, k, v, do, lse, delta, dk, dv, kl, *q.stride(), *k.stride(),
                                                      *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *sizes),
            params)
    return dq, dk, dv
