"""One test sweep that every attention backend must pass, subclassed per backend (as tokamax's shared test
base and jax-ml/jax tests/pallas/gpu_ops_test.py's `INTERPRET = True` subclasses do).

`AttentionHarness` holds the cases (`CASES`: no mask, causal, GQA/MQA, ragged query/key lengths, segment
ids, local windows, q_len != kv_len, lengths that are no block multiple, fully masked rows, float16 and
bfloat16) and the tests every subclass inherits:

  test_matches_float64[case]     forward and VJP in one jitted computation against the float64 NumPy
                                 reference (`attention_np.attention`), with a random cotangent (never a
                                 `.sum()` loss, whose all-ones cotangent hides errors), by relative L2 error
                                 with per-dtype tolerances over whole arrays; rows that see no key must be
                                 exactly 0 with exactly 0 dq, keys that no query sees get exactly 0 dk/dv.
  test_nan_inputs_propagate      a NaN input gives NaN in exactly the rows that see it; masked rows stay 0.
  test_no_infinity_under_debug_infs
                                 masking creates no infinity a user's jax.debug_infs would trip on.
  test_interpreter_poisons_unwritten_outputs
                                 interpreted Pallas backends only (POISON_INTERPRET set): the premise of
                                 "an unwritten output fails", an element no grid step writes is NaN.

NaN anywhere fails `rel_l2_error`, so under a poisoning interpreter an element a kernel forgets to write
cannot pass. The class name has no `Test` prefix, so pytest collects only its subclasses.

How to subclass (one class per backend and mode, in the backend's own test file):

    from attention_harness import AttentionHarness

    class TestMyKernelInterpret(AttentionHarness):
      INTERPRET = True
      DTYPES = ('bfloat16', 'float16')  # what it takes: float32 cases run in DTYPES[0], others skip
      BLOCK_SIZES = MyBlockSizes(block_q=64, block_k=64)  # small: the sweep's shapes span several blocks
      SKIP = {'q1_two_sided_window': 'why this backend cannot run it'}  # skipped, the reason shown
      XFAIL = {'huge_window_causal': 'the bug, described'}  # strict: an unexpected pass fails
      POISON_INTERPRET = True  # the interpret= value of an interpreted Pallas backend (else None)
      COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}  # interpreted kernels compile faster

      def attention(self, q, k, v, **mask_kwargs):
        # self.block_sizes is BLOCK_SIZES, or None in the case that checks the default tiles.
        return my_kernel(q, k, v, block_sizes=self.block_sizes, interpret=self.INTERPRET, **mask_kwargs)

      def skip_reason(self, case):  # optional: shapes the backend cannot take
        if case.head_dim % 64:
          return f'head_dim {case.head_dim} is not a multiple of 64'
        return super().skip_reason(case)

    class TestMyKernelCompiled(TestMyKernelInterpret):  # the same tests compiled, where the chip is
      INTERPRET = False
      POISON_INTERPRET = None
      COMPILER_OPTIONS = None

      @pytest.fixture(autouse=True)
      def _needs_gpu(self):
        if jax.default_backend() != 'gpu':
          pytest.skip('needs a GPU')

`attention(q, k, v, **mask_kwargs)` gets query [B, T, N, D], key/value [B, S, K, D] and the keywords of
`jax.nn.dot_product_attention` that the case sets (is_causal, scale, query_seq_lengths,
key_value_seq_lengths, local_window_size, plus segment_ids as one [B, T] array or a (query, key/value)
pair); it is traced under jax.jit (op by op in test_no_infinity_under_debug_infs). TOLERANCES (dtype ->
(output, gradients)) may be overridden. A subclass's own case runs through the same check with
`self.check_against_float64(self.prepare(request, Case(...)))`; `make_inputs(case)` gives any test the
inputs, mask keywords and float64 mask. Backend-specific tests (block-size choices, error messages,
layouts) stay in the backend's file, beside its subclasses.
"""

from __future__ import annotations

import dataclasses

import attention_np as ref_np
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOLERANCE, rel_l2_error

_HUGE = 2**31 - 2  # q_pos + window wraps around in int32 unless the window is clipped to the sequences


@dataclasses.dataclass(frozen=True)
class Case:
  """One input configuration: shapes, dtype and the mask arguments (None/False: not passed)."""

  name: str
  shape: tuple[int, int, int, int, int, int]  # (batch, q_len, kv_len, heads, kv_heads, head_dim)
  dtype: str = 'float32'
  is_causal: bool = False
  scale: float | None = None
  window: int | tuple[int, int] | None = None
  q_lens: tuple[int, ...] | None = None
  kv_lens: tuple[int, ...] | None = None
  # None; 'packed' (one sorted random [B, T] array, q_len == kv_len); 'pair' (sorted random query ids in
  # 0..3, key/value ids in 0..2, so query segment 3 sees no key); 'orphan_rows' (query rows 20:30 of batch
  # 0 in a segment that no key has, everything else segment 0).
  segments: str | None = None
  default_blocks: bool = False  # run with the backend's default tiles instead of BLOCK_SIZES
  expect_empty_rows: bool = False  # the case is meant to have query rows that see no key
  seed: int = 0

  batch = property(lambda self: self.shape[0])
  q_len = property(lambda self: self.shape[1])
  kv_len = property(lambda self: self.shape[2])
  heads = property(lambda self: self.shape[3])
  kv_heads = property(lambda self: self.shape[4])
  head_dim = property(lambda self: self.shape[5])


# Each feature a few times, combined, not the cartesian product (interpreted kernels are slow). Lengths
# are odd on purpose (1, 7, 77, 133, 200, 333), no block multiple but in the first case; several cases
# have query rows that see no key (expect_empty_rows) and keys that no query sees.
CASES = (
  Case('no_mask_block_multiple', (1, 256, 256, 2, 2, 64)),  # the unmasked path, nothing padded
  Case('no_mask_mqa_q1_scale', (2, 1, 200, 2, 1, 64), scale=0.3),
  Case('causal_gqa_d40', (1, 200, 200, 4, 2, 40), is_causal=True),
  Case('causal_mqa_q_shorter_kv_lens', (2, 7, 200, 4, 1, 64), is_causal=True, kv_lens=(5, 200)),
  # q longer than kv: rows 37.. see no key (whole query blocks skipped), nor batch 1's rows 3..
  Case(
    'causal_window_q_longer_empty_rows',
    (2, 200, 7, 2, 1, 40),
    is_causal=True,
    window=(30, 0),
    q_lens=(200, 3),
    expect_empty_rows=True,
  ),
  # Batch 1 sees no key at all (kv length 0); rows past the query lengths see none either.
  Case(
    'ragged_lengths_empty_rows',
    (3, 200, 333, 2, 2, 64),
    q_lens=(200, 57, 150),
    kv_lens=(131, 0, 1),
    expect_empty_rows=True,
  ),
  Case('segments_packed_causal', (2, 200, 200, 2, 1, 64), is_causal=True, segments='packed'),
  Case('segments_pair_empty_rows', (2, 200, 133, 4, 2, 64), segments='pair', expect_empty_rows=True),
  # Batch 1: rows 150.. see no key (their window starts past the key length).
  Case(
    'window_right_kv_lens_empty_rows_d128',
    (2, 200, 333, 2, 2, 128),
    window=(0, 9),
    kv_lens=(333, 150),
    expect_empty_rows=True,
  ),
  Case('window_int_causal', (1, 333, 333, 2, 2, 64), is_causal=True, window=31),
  Case('q1_two_sided_window', (1, 1, 200, 2, 2, 64), window=(3, 150)),
  Case('huge_window_causal', (1, 77, 77, 2, 1, 32), is_causal=True, window=(_HUGE, _HUGE)),
  # Every kind of fully masked row at once: past the query length, in an orphan segment, kv length 0.
  Case(
    'fully_masked_rows',
    (2, 100, 67, 2, 1, 64),
    is_causal=True,
    q_lens=(37, 100),
    kv_lens=(67, 0),
    segments='orphan_rows',
    expect_empty_rows=True,
  ),
  Case(
    'everything_gqa',
    (2, 77, 77, 4, 2, 32),
    is_causal=True,
    window=(20, 0),
    q_lens=(77, 50),
    kv_lens=(70, 77),
    segments='packed',
    expect_empty_rows=True,
  ),
  Case(
    'bf16_causal_gqa_lengths_default_blocks',
    (2, 200, 133, 4, 2, 128),
    dtype='bfloat16',
    is_causal=True,
    q_lens=(200, 150),
    kv_lens=(133, 80),
    default_blocks=True,
    expect_empty_rows=True,
  ),
  Case(
    'fp16_window_gqa_segments_pair', (2, 50, 70, 4, 2, 40), dtype='float16', window=(5, 2), segments='pair'
  ),
)
CASE_BY_NAME = {c.name: c for c in CASES}

# The cases of the special tests (they go through skip_reason like the sweep's cases).
NAN_CASE = Case('nan_inputs', (2, 20, 20, 2, 1, 32), is_causal=True, q_lens=(20, 12))
DEBUG_INFS_CASE = Case('debug_infs', (1, 4, 4, 2, 2, 32), is_causal=True)  # 4: no block multiple


def _segment_ids(case: Case, rng):
  b, t, s = case.batch, case.q_len, case.kv_len
  if case.segments == 'packed':
    assert t == s, case
    return np.sort(rng.integers(0, 4, (b, t)), axis=1)
  if case.segments == 'pair':
    return np.sort(rng.integers(0, 4, (b, t)), axis=1), np.sort(rng.integers(0, 3, (b, s)), axis=1)
  if case.segments == 'orphan_rows':
    q_seg = np.zeros((b, t), np.int64)
    q_seg[0, 20:30] = 9
    return q_seg, np.zeros((b, s), np.int64)
  raise ValueError(f'unknown segments {case.segments!r}')


def make_inputs(case: Case):
  """(q, k, v, d_out) in case.dtype, the backend's mask keyword arguments and the float64 NumPy mask.

  The mask is [B, 1, T, S] bool (True = attend), from `attention_np.mask`, independent of library code.
  """
  rng = np.random.default_rng(case.seed)
  dtype = jnp.dtype(case.dtype)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)

  q = normal(case.batch, case.q_len, case.heads, case.head_dim)
  k = normal(case.batch, case.kv_len, case.kv_heads, case.head_dim)
  v = normal(case.batch, case.kv_len, case.kv_heads, case.head_dim)
  d_out = normal(*q.shape)  # random cotangent
  kwargs, np_kw = {}, dict(causal=case.is_causal, window=case.window)
  if case.is_causal:
    kwargs['is_causal'] = True
  if case.scale is not None:
    kwargs['scale'] = case.scale
  if case.window is not None:
    kwargs['local_window_size'] = case.window
  if case.q_lens is not None:
    kwargs['query_seq_lengths'] = jnp.asarray(case.q_lens, jnp.int32)
    np_kw['q_lens'] = case.q_lens
  if case.kv_lens is not None:
    kwargs['key_value_seq_lengths'] = jnp.asarray(case.kv_lens, jnp.int32)
    np_kw['kv_lens'] = case.kv_lens
  if case.segments is not None:
    seg = _segment_ids(case, rng)
    if isinstance(seg, tuple):
      kwargs['segment_ids'] = tuple(jnp.asarray(s, jnp.int32) for s in seg)
      np_kw['q_seg'], np_kw['kv_seg'] = seg
    else:
      kwargs['segment_ids'] = jnp.asarray(seg, jnp.int32)
      np_kw['q_seg'] = np_kw['kv_seg'] = seg
  keep = ref_np.mask(case.batch, case.q_len, case.kv_len, **np_kw)
  return (q, k, v, d_out), kwargs, keep


class AttentionHarness:
  """The shared sweep; see the module docstring for how to subclass it."""

  # The dtypes the backend takes (cases in other dtypes are skipped, saying so).
  DTYPES = ('float32', 'bfloat16', 'float16')
  # Relative L2 error allowed against float64: dtype -> (output, gradients).
  TOLERANCES = {
    name: (TOLERANCE[np.dtype(jnp.dtype(name))], TOLERANCE[np.dtype(jnp.dtype(name))])
    for name in ('float32', 'bfloat16', 'float16')
  }
  # The backend's block sizes for the sweep (small, so small shapes run several blocks), as the subclass's
  # `attention` reads them from self.block_sizes; None there means the backend's defaults.
  BLOCK_SIZES = None
  SKIP: dict[str, str] = {}  # case name -> why this backend does not run it
  XFAIL: dict[str, str] = {}  # case name -> the known bug (strict: an unexpected pass fails)
  # Interpreted Pallas backends: the `interpret=` argument their interpreter takes (True, or e.g. a
  # pltpu.InterpretParams()); test_interpreter_poisons_unwritten_outputs checks it poisons outputs.
  POISON_INTERPRET = None
  COMPILER_OPTIONS = None  # XLA compile options of the jitted forward + backward

  block_sizes = None

  def attention(self, q, k, v, **mask_kwargs):
    """The backend: [B, T, N, D], [B, S, K, D] x2 and the case's mask keywords -> [B, T, N, D]."""
    raise NotImplementedError

  def skip_reason(self, case: Case) -> str | None:
    """Why this backend does not run `case` (None: it runs). Override for unsupported shapes."""
    if case.name in self.SKIP:
      return self.SKIP[case.name]
    if case.dtype not in self.DTYPES:
      return f"{case.dtype} is not among this backend's dtypes {self.DTYPES}"
    return None

  def prepare(self, request, case: Case) -> Case:
    """The case as this backend runs it, skipped or strictly xfailed as the subclass says; sets
    self.block_sizes. A backend without float32 runs the float32 cases in DTYPES[0], so that a
    bf16/fp16-only kernel still runs every mask."""
    if case.dtype == 'float32' and 'float32' not in self.DTYPES:
      case = dataclasses.replace(case, dtype=self.DTYPES[0])
    reason = self.skip_reason(case)
    if reason:
      pytest.skip(reason)
    if case.name in self.XFAIL:
      request.applymarker(pytest.mark.xfail(reason=self.XFAIL[case.name], strict=True))
    self.block_sizes = None if case.default_blocks else self.BLOCK_SIZES
    return case

  def _compiled(self, fn, *args):
    """fn(*args) jitted, compiled with COMPILER_OPTIONS."""
    return jax.jit(fn).lower(*args).compile(compiler_options=self.COMPILER_OPTIONS)(*args)

  @pytest.mark.parametrize('case', CASES, ids=lambda c: c.name)
  def test_matches_float64(self, request, case: Case):
    self.check_against_float64(self.prepare(request, case))

  def check_against_float64(self, case: Case):
    """The body of test_matches_float64, for subclasses' own cases: `self.check_against_float64(
    self.prepare(request, Case(...)))`, setting self.block_sizes in between to try other tiles."""
    (q, k, v, d_out), kwargs, keep = make_inputs(case)

    def value_and_vjp(q, k, v, d_out):
      out, vjp = jax.vjp(lambda q, k, v: self.attention(q, k, v, **kwargs), q, k, v)
      return out, vjp(d_out)

    out, grads = self._compiled(value_and_vjp, q, k, v, d_out)
    ref_out, ref_grads = ref_np.attention(q, k, v, keep, scale=case.scale, d_out=d_out)
    out_tol, grad_tol = self.TOLERANCES[case.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape, (out.dtype, out.shape)
    errors = {'out': rel_l2_error(out, ref_out)}
    for name, g, ref_g, x in zip(('dq', 'dk', 'dv'), grads, ref_grads, (q, k, v)):
      assert g.dtype == x.dtype and g.shape == x.shape, (name, g.dtype, g.shape)
      errors[name] = rel_l2_error(g, ref_g)
    bad = {n: e for n, e in errors.items() if e > (out_tol if n == 'out' else grad_tol)}
    assert not bad, f'relative L2 errors {errors} exceed tolerances ({out_tol:.0e}, {grad_tol:.0e})'

    # Rows that see no key: exactly 0 output and 0 dq; keys that no query sees: exactly 0 dk and dv.
    empty_rows, unseen_keys = ~keep[:, 0].any(axis=2), ~keep[:, 0].any(axis=1)  # [B, T], [B, S]
    if case.expect_empty_rows:
      assert empty_rows.any(), 'the case is meant to have fully masked rows'
    out, (dq, dk, dv) = np.asarray(out), [np.asarray(g) for g in grads]
    np.testing.assert_array_equal(out[empty_rows], 0.0, err_msg='fully masked rows must be exactly 0')
    np.testing.assert_array_equal(dq[empty_rows], 0.0, err_msg='fully masked rows get exactly 0 dq')
    np.testing.assert_array_equal(dk[unseen_keys], 0.0, err_msg='keys no query sees get exactly 0 dk')
    np.testing.assert_array_equal(dv[unseen_keys], 0.0, err_msg='keys no query sees get exactly 0 dv')

  def test_nan_inputs_propagate(self, request):
    # A NaN must never be hidden: the fused kernels once tested `l > 0` for "this row saw a key", which a
    # NaN sum fails, so a NaN row came out as a masked row of zeros. Rows that see no key must still be 0.
    case = self.prepare(request, NAN_CASE)
    (q, k, v, _), kwargs, keep = make_inputs(case)
    q = q.at[0, 5, 0, 3].set(jnp.nan)  # a query: row 5 of batch 0, head 0
    k = k.at[1, 8, 0, 0].set(jnp.nan)  # a key that rows 8.. of batch 1 see (causal); 12.. are masked
    out = np.asarray(self._compiled(lambda q, k, v: self.attention(q, k, v, **kwargs), q, k, v))
    nan_rows = np.zeros(out.shape[:3], bool)  # [batch, q_len, heads]
    nan_rows[0, 5, 0] = True
    nan_rows[1, 8:12, :] = True
    assert np.all(np.isnan(out[nan_rows])), 'a NaN input was hidden'
    assert np.all(np.isfinite(out[~nan_rows])), 'NaN leaked into rows that never saw it'
    assert np.all(out[1, 12:] == 0.0), 'rows past the query length must be exactly 0'
    clean = ref_np.attention(jnp.where(jnp.isnan(q), 0, q), jnp.where(jnp.isnan(k), 0, k), v, keep)
    rows_ok = ~nan_rows
    rows_ok[1, 8:] = False  # these saw the NaN key (8:12) or are masked (12:)
    out_tol = max(self.TOLERANCES[case.dtype][0], 1e-5)
    assert rel_l2_error(out[rows_ok], clean[rows_ok]) <= out_tol

  def test_no_infinity_under_debug_infs(self, request):
    # A user's jax.debug_infs must not trip on our masking: 'reference' filled hidden logits with -inf and
    # raised in convert_element_type; the Pallas backward kept +inf as the LSE of padded rows (length 4 is
    # not a block multiple), a residual that tripped the check and sent its op-by-op re-run into recursion.
    case = self.prepare(request, DEBUG_INFS_CASE)
    (q, k, v, d_out), kwargs, keep = make_inputs(case)
    with jax.debug_infs(True):
      out, pullback = jax.vjp(lambda q, k, v: self.attention(q, k, v, **kwargs), q, k, v)
      grads = pullback(d_out)
    ref_out, ref_grads = ref_np.attention(q, k, v, keep, d_out=d_out)
    out_tol, grad_tol = self.TOLERANCES[case.dtype]
    assert rel_l2_error(out, ref_out) <= out_tol, 'out'
    for name, g, e in zip(('dq', 'dk', 'dv'), grads, ref_grads):
      assert rel_l2_error(g, e) <= grad_tol, name

  def test_interpreter_poisons_unwritten_outputs(self):
    # The premise of "unwritten elements fail": an output element that no grid step writes is NaN. (A
    # buffer that several grid steps share, as in Pallas TPU interpret mode, carries what earlier steps
    # wrote into it: an element a later step forgets holds another block's value and fails as wrong.)
    if self.POISON_INTERPRET is None:
      pytest.skip('not an interpreted Pallas backend')
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
      o_ref[:4] = x_ref[:4]  # rows 4:8 of every block are never written

    out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
      grid=(2,),
      in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
      interpret=self.POISON_INTERPRET,
    )(jnp.ones((16, 128)))
    written = np.tile(np.arange(8) < 4, 2)  # [16]
    out = np.asarray(out)
    assert np.all(out[written] == 1.0) and np.all(np.isnan(out[~written]))
