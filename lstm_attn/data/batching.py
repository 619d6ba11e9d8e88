"""Deterministic, resumable batchers for next-token LM, masked LM (BERT's 80/10/10) and next-sentence pairs.

Every batcher draws batch `i` from a counter-based RNG, `np.random.default_rng((seed, stream, i))`, so a
batch is a pure function of (seed, i): `batch(i)` may be called in any order, and the position in the
stream is one integer. `state()` returns a small dict of ints (the step plus what identifies the data, so a
restore onto different data fails loudly) that a checkpoint carries; `restore(state)` continues exactly
where the saved batcher stood. `next()` (also `next(batcher)`) returns the batch at the current step and
advances.

Batch dicts (numpy, int32 unless noted):
  LMBatcher          inputs [batch, seq_len], targets [batch, seq_len] (inputs shifted by one token);
                     sequential mode adds resets (float32) [batch, seq_len], and random BPTT lengths
                     seq_lengths [batch] and weights (float32, 0 on the padding) [batch, seq_len].
  eval_batches       inputs, targets, weights (float32, 0 on padding) [batch, seq_len].
  MLMBatcher         inputs (masked), targets (original ids), weights (float32, 1 where a token was
                     selected for prediction), token_type_ids (zeros), seq_lengths [batch].
  BertBatcher        as MLMBatcher, with token_type_ids 0 for [CLS] A [SEP] and 1 for B [SEP], pad_id
  / NSPBatcher       after seq_lengths, and nsp_labels [batch]: 0 = B follows A, 1 = B is random (BERT's
                     convention: `next_sentence_label = 1 if is_random_next`).
"""

from __future__ import annotations

import numpy as np

from lstm_attn.checks import check_rate

LM_MODES = ('random', 'sequential')


def _as_tokens(tokens, name='tokens') -> np.ndarray:
  arr = np.asarray(tokens)
  if arr.ndim != 1:
    raise ValueError(f'{name}: expected a 1-D array of token ids, got shape {arr.shape}')
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'{name}: expected integer token ids, got dtype {arr.dtype}')
  return arr.astype(np.int32, copy=False)


def _check_positive(name, value, minimum=1):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f'{name}: expected an int >= {minimum}, got {value!r}')
  return int(value)


def _check_ids(name, tokens, vocab_size):
  """Token ids outside [0, vocab_size) would become NaN embeddings in the model, with no error."""
  if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(
      f"{name}: ids must be in [0, {vocab_size}) (the tokenizer's vocabulary), "
      f'got {tokens.min()}..{tokens.max()}'
    )


class _Batcher:
  """Step counter, counter-based RNG and state()/restore() shared by every batcher."""

  _stream = 0  # distinct per batcher class, so two batchers with one seed draw independent streams

  def __init__(self, seed):
    self.seed = _check_positive('seed', seed, minimum=0)
    self.step = 0

  def _rng(self, step: int) -> np.random.Generator:
    return np.random.default_rng((self.seed, self._stream, int(step)))

  def _identity(self) -> dict[str, int]:
    """Ints that identify the data and shapes; restore() refuses a state whose identity differs."""
    raise NotImplementedError

  def batch(self, step: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def state(self) -> dict[str, int]:
    """{'step', 'seed', ...identity}: all ints, small enough for any checkpoint."""
    return {'step': int(self.step), 'seed': int(self.seed), **self._identity()}

  def restore(self, state) -> None:
    """Continues from a saved `state()`. Values may be Python ints or 0-d arrays (as a checkpoint returns)."""
    want = {'seed': self.seed, **self._identity()}
    missing = sorted((set(want) | {'step'}) - set(state))
    if missing:
      raise ValueError(f'batcher state: missing keys {missing}; expected the dict returned by state()')
    for key, value in want.items():
      got = int(np.asarray(state[key]))
      if got != value:
        raise ValueError(
          f'batcher state: {key}={got} but this {type(self).__name__} has {key}={value}; '
          'the state was saved for different data or settings'
        )
    step = int(np.asarray(state['step']))
    if step < 0:
      raise ValueError(f'batcher state: step must be >= 0, got {step}')
    self.step = step

  def next(self) -> dict[str, np.ndarray]:
    out = self.batch(self.step)
    self.step += 1
    return out

  __next__ = next

  def __iter__(self):
    return self


class LMBatcher(_Batcher):
  """Next-token batches from one token stream.

  mode='random': like nanoGPT's get_batch, each row is a window at a uniform start in
    [0, len(tokens) - seq_len); inputs = tokens[s : s + seq_len], targets = tokens[s + 1 : s + seq_len + 1].
  mode='sequential': the stream is cut into `batch_size` contiguous lanes (AWD-LSTM's batchify) and step i
    reads the next `seq_len` tokens of every lane, so row b of batch i+1 continues row b of batch i (for
    models that carry their state across batches). One epoch is `steps_per_epoch` steps (with random
    BPTT lengths, as many windows as fit); then it wraps (`epoch(step)` says which epoch a step is in).
    Sequential batches also hold resets [B, T] float32: 1 where a carried state must restart: the first
    step of an epoch (every lane starts over) and the first token of every document (`doc_starts`: token
    positions where a document begins).

  Randomised BPTT lengths (AWD-LSTM; sequential mode only): with `bptt_half_prob` > 0 or `bptt_std` > 0
  each step reads a window of `length` tokens per lane, length ~ N(base, bptt_std) rounded and clipped to
  [min(5, seq_len), seq_len] with base = seq_len // 2 with probability bptt_half_prob, else seq_len, so the
  truncation points move from epoch to epoch. The arrays stay [batch, seq_len] (one compiled step): the
  batch also holds seq_lengths [B] int32 (= length in every lane) and weights [B, T] float32 (1 on the
  first `length` targets), and tokens past `length` are padding (the next window starts right after the
  last valid one). AWD-LSTM lets a length exceed its bptt; here seq_len is the longest window. The lengths
  of an epoch come from their own counter-based RNG, so batch(i) is still a pure function of (seed, i).
  """

  _stream = 1

  def __init__(
    self,
    tokens,
    batch_size: int,
    seq_len: int,
    *,
    seed: int = 0,
    mode: str = 'random',
    doc_starts=None,
    bptt_half_prob: float = 0.0,
    bptt_std: float = 0.0,
  ):
    super().__init__(seed)
    self.tokens = _as_tokens(tokens)
    self._doc_start = _doc_start_mask(doc_starts, len(self.tokens))  # [num_tokens] bool
    self.batch_size = _check_positive('batch_size', batch_size)
    self.seq_len = _check_positive('seq_len', seq_len)
    if mode not in LM_MODES:
      raise ValueError(f'mode: expected one of {LM_MODES}, got {mode!r}')
    self.mode = mode
    n = len(self.tokens)
    if n < self.seq_len + 1:
      raise ValueError(
        f'tokens: {n} tokens are too few for seq_len={self.seq_len} (need at least seq_len + 1)'
      )
    self._lane_len = (n - 1) // self.batch_size
    self.steps_per_epoch = self._lane_len // self.seq_len
    if mode == 'sequential' and self.steps_per_epoch < 1:
      raise ValueError(
        f'tokens: {n} tokens cannot fill {self.batch_size} lanes of seq_len={self.seq_len} in sequential '
        f'mode (need at least batch_size * seq_len + 1 = {self.batch_size * self.seq_len + 1})'
      )
    self._offsets = np.arange(self.seq_len + 1)  # [seq_len + 1]
    self.bptt_half_prob = check_rate('bptt_half_prob', bptt_half_prob, closed=True)
    ok = isinstance(bptt_std, (int, float, np.number)) and not isinstance(bptt_std, bool)
    if not ok or not 0 <= bptt_std < float('inf'):
      raise ValueError(f'bptt_std must be a finite number >= 0 (0: no jitter), got {bptt_std!r}')
    self.bptt_std = float(bptt_std)
    self.random_bptt = self.bptt_half_prob > 0 or self.bptt_std > 0
    if self.random_bptt and mode != 'sequential':
      raise ValueError(
        f'bptt_half_prob={bptt_half_prob!r}, bptt_std={bptt_std!r}: randomised BPTT lengths need '
        f"mode='sequential' (got {mode!r}), or set both to 0"
      )
    self._epoch_ends = []  # random_bptt: cumulative number of steps at the end of each epoch so far
    self._plans = {}  # random_bptt: epoch -> (window offsets, lengths), the last few epochs

  def _identity(self):
    identity = {
      'num_tokens': len(self.tokens),
      'batch_size': self.batch_size,
      'seq_len': self.seq_len,
      'mode': LM_MODES.index(self.mode),
    }
    if self.random_bptt:  # as ints (a checkpoint holds ints): parts per million, thousandths
      identity['bptt_half_prob_ppm'] = round(self.bptt_half_prob * 1e6)
      identity['bptt_std_milli'] = round(self.bptt_std * 1e3)
    return identity

  def restore(self, state) -> None:
    # The random-BPTT identity is saved only when on, so the base check (this batcher's keys) would let a
    # fixed-window batcher take a random-BPTT state: compare both ways, absent meaning off.
    for key, now in (
      ('bptt_half_prob_ppm', self.bptt_half_prob * 1e6),
      ('bptt_std_milli', self.bptt_std * 1e3),
    ):
      saved = int(np.asarray(state.get(key, 0)))
      if saved != round(now):
        raise ValueError(
          f'batcher state: {key}={saved} but this LMBatcher has {key}={round(now)}; '
          'the state was saved with other random-BPTT settings'
        )
    super().restore(state)

  def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """random_bptt: (offsets, lengths) of the windows one epoch reads, in every lane (AWD-LSTM's rule)."""
    if epoch not in self._plans:
      rng = np.random.default_rng((self.seed, self._stream, int(epoch), 1))  # not any step's (seed, 1, i)
      shortest = min(5, self.seq_len)
      n = self._lane_len // shortest + 1  # more windows than can fit in a lane
      base = np.where(rng.random(n) < self.bptt_half_prob, max(self.seq_len // 2, 1), self.seq_len)
      lengths = rng.normal(base, self.bptt_std) if self.bptt_std else base
      lengths = np.clip(np.rint(lengths), shortest, self.seq_len).astype(np.int64)
      ends = np.cumsum(lengths)
      fit = int(np.searchsorted(ends, self._lane_len, side='right'))  # windows with end <= lane length
      if len(self._plans) >= 4:
        self._plans.pop(next(iter(self._plans)))
      self._plans[epoch] = (ends[:fit] - lengths[:fit], lengths[:fit])
    return self._plans[epoch]

  def _locate(self, step: int) -> tuple[int, int]:
    """(epoch, index of the step within it)."""
    step = int(step)
    if not self.random_bptt:
      return step // self.steps_per_epoch, step % self.steps_per_epoch
    while not self._epoch_ends or self._epoch_ends[-1] <= step:
      done = self._epoch_ends[-1] if self._epoch_ends else 0
      self._epoch_ends.append(done + len(self._plan(len(self._epoch_ends))[0]))
    epoch = int(np.searchsorted(self._epoch_ends, step, side='right'))
    return epoch, step - (self._epoch_ends[epoch - 1] if epoch else 0)

  def mean_window_length(self) -> float:
    """Tokens per lane per step: seq_len, or with random BPTT lengths the mean over the first epoch."""
    return float(np.mean(self._plan(0)[1])) if self.random_bptt else float(self.seq_len)

  def epoch(self, step: int) -> int:
    """The epoch a step reads from (sequential mode; random mode counts epochs of len(tokens) tokens)."""
    if self.mode == 'sequential':
      return self._locate(step)[0]
    return int(step) * self.batch_size * self.seq_len // len(self.tokens)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    length = self.seq_len
    if self.mode == 'random':
      starts = self._rng(step).integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
    else:
      epoch, k = self._locate(step)
      offset = k * self.seq_len
      if self.random_bptt:
        offsets, lengths = self._plan(epoch)
        offset, length = int(offsets[k]), int(lengths[k])
      starts = np.arange(self.batch_size) * self._lane_len + offset
    # Past `length` (random BPTT) a window may run beyond the stream's end: those tokens are padding.
    index = np.minimum(starts[:, None] + self._offsets, len(self.tokens) - 1)  # [batch, seq_len + 1]
    windows = self.tokens[index]
    batch = {'inputs': windows[:, :-1], 'targets': windows[:, 1:]}
    if self.mode == 'sequential':
      valid = self._offsets[:-1] < length  # [seq_len]
      resets = self._doc_start[index[:, :-1]] & valid  # [batch, seq_len]; none in the padding
      resets[:, 0] |= k == 0
      batch['resets'] = resets.astype(np.float32)
      if self.random_bptt:
        batch['seq_lengths'] = np.full(self.batch_size, length, np.int32)
        batch['weights'] = np.broadcast_to(valid, resets.shape).astype(np.float32)
    return batch


def _doc_start_mask(doc_starts, n: int) -> np.ndarray:
  """[n] bool, True at the token positions in `doc_starts` (None: no document boundaries)."""
  mask = np.zeros(n, bool)
  if doc_starts is not None:
    starts = np.asarray(doc_starts, np.int64)
    if starts.size and (starts.min() < 0 or starts.max() >= n):
      raise ValueError(f'doc_starts must be token positions in [0, {n}), got {starts.min()}..{starts.max()}')
    mask[starts] = True
  return mask


def eval_batches(
  tokens, batch_size: int, seq_len: int, *, contiguous: bool = False, pad_id: int = 0, doc_starts=None
):
  """Iterates over a split once: every one of the len(tokens) - 1 next-token targets appears exactly once.

  Yields {'inputs', 'targets': int32 [batch, seq_len], 'weights': float32 [batch, seq_len]}; weights are 1
  on real targets and 0 on padding (the last window and the last batch are padded with `pad_id` to keep
  shapes static, so a jitted eval step compiles once). Weighted mean of the per-token loss = split loss.

  contiguous=False: non-overlapping windows (context restarts every seq_len tokens), batch_size at a time.
  contiguous=True: batch_size contiguous lanes read seq_len at a time, so row b of each batch continues
    row b of the one before (for LSTMs carrying state across batches, as AWD-LSTM evaluates); then the
    batches also hold resets [B, T] float32, 1 at the first token of each document (`doc_starts`).
  """
  tokens = _as_tokens(tokens)
  batch_size = _check_positive('batch_size', batch_size)
  seq_len = _check_positive('seq_len', seq_len)
  m = len(tokens) - 1  # number of targets
  if m < 1:
    raise ValueError(f'tokens: need at least 2 tokens to evaluate next-token prediction, got {len(tokens)}')
  if contiguous:
    lane = -(-m // batch_size)
    steps = -(-lane // seq_len)
    width = steps * seq_len
    total = batch_size * lane
  else:
    windows = -(-m // seq_len)
    rows = -(-windows // batch_size) * batch_size
    total = rows * seq_len
  inputs = np.full(total, pad_id, np.int32)
  targets = np.full(total, pad_id, np.int32)
  weights = np.zeros(total, np.float32)
  inputs[:m], targets[:m], weights[:m] = tokens[:-1], tokens[1:], 1.0
  if contiguous:
    resets = np.zeros(total, np.float32)
    resets[:m] = _doc_start_mask(doc_starts, len(tokens))[:-1]
    pad = ((0, 0), (0, width - lane))
    inputs, targets = (
      np.pad(a.reshape(batch_size, lane), pad, constant_values=pad_id) for a in (inputs, targets)
    )
    weights, resets = (np.pad(a.reshape(batch_size, lane), pad) for a in (weights, resets))
    for k in range(steps):
      cols = slice(k * seq_len, (k + 1) * seq_len)
      yield {
        'inputs': inputs[:, cols],
        'targets': targets[:, cols],
        'weights': weights[:, cols],
        'resets': resets[:, cols],
      }
  else:
    inputs, targets, weights = (a.reshape(rows, seq_len) for a in (inputs, targets, weights))
    for r in range(0, rows, batch_size):
      yield {
        'inputs': inputs[r : r + batch_size],
        'targets': targets[r : r + batch_size],
        'weights': weights[r : r + batch_size],
      }


def mlm_mask(
  tokens, rng: np.random.Generator, *, mask_rate: float = 0.15, vocab_size: int, mask_id: int, special_ids
):
  """BERT's masking: each non-special token is selected with probability `mask_rate`; of those, 80% become
  `mask_id`, 10% a uniformly random non-special id, 10% stay as they are.

  Selection is per-token Bernoulli (as Hugging Face's DataCollatorForLanguageModeling), so counts vary
  slightly per sequence; BERT's own data pipeline picks exactly round(15%) per sequence.
  tokens: int [...]; special_ids: ids never selected (PAD, CLS, SEP, MASK, UNK) and never drawn as random.
  Returns {'inputs': int32 [...] (masked), 'targets': int32 [...] (= tokens),
           'weights': float32 [...] (1 where selected)}.
  """
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'tokens: expected integer token ids, got dtype {tokens.dtype}')
  check_rate('mask_rate', mask_rate, closed=True)
  special = np.asarray(sorted(set(int(i) for i in special_ids)), np.int64)
  allowed = np.setdiff1d(np.arange(vocab_size), special)  # ids a random replacement may take
  if not len(allowed):
    raise ValueError(f'vocab_size={vocab_size} leaves no non-special id for random replacement')
  selected = ~np.isin(tokens, special) & (rng.random(tokens.shape) < mask_rate)
  kind = rng.random(tokens.shape)  # < 0.8: [MASK]; < 0.9: random id; else keep
  random_ids = allowed[rng.integers(0, len(allowed), size=tokens.shape)]
  inputs = np.where(selected & (kind < 0.8), mask_id, tokens)
  inputs = np.where(selected & (kind >= 0.8) & (kind < 0.9), random_ids, inputs)
  return {
    'inputs': inputs.astype(np.int32),
    'targets': tokens.astype(np.int32),
    'weights': selected.astype(np.float32),
  }


def _specials(tokenizer):
  """(pad, cls, sep, mask, vocab_size, special_ids) from a tokenizer, validated."""
  try:
    return (
      int(tokenizer.pad_id),
      int(tokenizer.cls_id),
      int(tokenizer.sep_id),
      int(tokenizer.mask_id),
      int(tokenizer.vocab_size),
      tuple(tokenizer.special_ids),
    )
  except AttributeError as e:
    raise ValueError(
      f'tokenizer: expected an lstm_attn.data tokenizer (pad_id, cls_id, sep_id, mask_id, vocab_size, '
      f'special_ids), got {type(tokenizer).__name__}'
    ) from e


class MLMBatcher(_Batcher):
  """Masked-LM batches without sentence pairs (RoBERTa-style): [CLS] window [SEP] from a token stream.

  Each row is a window of seq_len - 2 tokens at a uniform random start, wrapped in [CLS] ... [SEP], then
  masked by `mlm_mask`. Returns inputs, targets, weights, token_type_ids (zeros), seq_lengths (= seq_len).
  """

  _stream = 2

  def __init__(
    self, tokens, batch_size: int, seq_len: int, *, seed: int = 0, tokenizer, mask_rate: float = 0.15
  ):
    super().__init__(seed)
    self.tokens = _as_tokens(tokens)
    self.batch_size = _check_positive('batch_size', batch_size)
    self.seq_len = _check_positive('seq_len', seq_len, minimum=3)
    self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.vocab_size, self.special_ids = _specials(
      tokenizer
    )
    self.mask_rate = check_rate('mask_rate', mask_rate, closed=True)
    _check_ids('tokens', self.tokens, self.vocab_size)
    if len(self.tokens) < seq_len - 2:
      raise ValueError(
        f'tokens: {len(self.tokens)} tokens are too few for seq_len={seq_len} (need seq_len - 2)'
      )
    self._offsets = np.arange(seq_len - 2)

  def _identity(self):
    return {'num_tokens': len(self.tokens), 'batch_size': self.batch_size, 'seq_len': self.seq_len}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rng = self._rng(step)
    starts = rng.integers(0, len(self.tokens) - (self.seq_len - 2) + 1, size=self.batch_size)
    rows = np.empty((self.batch_size, self.seq_len), np.int32)  # [batch, seq_len]
    rows[:, 0], rows[:, -1] = self.cls_id, self.sep_id
    rows[:, 1:-1] = self.tokens[starts[:, None] + self._offsets]
    out = mlm_mask(
      rows,
      rng,
      mask_rate=self.mask_rate,
      vocab_size=self.vocab_size,
      mask_id=self.mask_id,
      special_ids=self.special_ids,
    )
    out['token_type_ids'] = np.zeros_like(rows)
    out['seq_lengths'] = np.full(self.batch_size, self.seq_len, np.int32)
    return out


class BertBatcher(_Batcher):
  """BERT pre-training batches: [CLS] A [SEP] B [SEP] pairs with next-sentence labels and MLM masking.

  documents: a list of str (encoded with `tokenizer`) or of 1-D int arrays; documents of < 2 tokens are
  dropped. For each row: a document is drawn with probability proportional to its length, a span of up to
  seq_len - 3 tokens at a uniform start, cut at a uniform point into A (>= 1 token) and the rest. Exactly
  half the rows of a batch (a fair coin for the odd one) are 'is next' (label 0: B is that rest); the others
  (label 1) take B, of the same length, from a uniform position of a different document (with a single
  document: from a position at least seq_len - 3 tokens away from A's span). Rows shorter than seq_len
  (short documents) are padded with pad_id after `seq_lengths`. MLM masking (`mlm_mask`) never touches
  CLS/SEP/PAD; mask_rate=0 gives plain NSP batches (`NSPBatcher`).
  """

  _stream = 3

  def __init__(
    self,
    documents,
    batch_size: int,
    seq_len: int,
    *,
    seed: int = 0,
    tokenizer,
    mask_rate: float = 0.15,
  ):
    super().__init__(seed)
    self.batch_size = _check_positive('batch_size', batch_size)
    self.seq_len = _check_positive('seq_len', seq_len, minimum=5)
    self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.vocab_size, self.special_ids = _specials(
      tokenizer
    )
    self.mask_rate = check_rate('mask_rate', mask_rate, closed=True)
    docs = [tokenizer.encode(d) if isinstance(d, str) else _as_tokens(d, 'documents[i]') for d in documents]
    for d in docs:
      _check_ids('documents', d, self.vocab_size)
    self.documents = [d for d in docs if len(d) >= 2]
    if not self.documents:
      raise ValueError('documents: no document has at least 2 tokens')
    self._lengths = np.array([len(d) for d in self.documents], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self._lengths)])  # [num_docs + 1]
    self._budget = self.seq_len - 3
    if len(self.documents) == 1 and self._lengths[0] < 8 * self.seq_len:
      raise ValueError(
        f'documents: a single document of {self._lengths[0]} tokens is too short to draw random B segments '
        f'far from A; need at least 8 * seq_len = {8 * self.seq_len} tokens, or several documents'
      )

  def _identity(self):
    return {
      'num_tokens': int(self._starts[-1]),
      'num_documents': len(self.documents),
      'batch_size': self.batch_size,
      'seq_len': self.seq_len,
    }

  def _random_segment(self, rng, d: int, s: int, avail: int, length: int) -> np.ndarray:
    """`length` tokens from a document other than d (or, with one document, far from [s, s + avail))."""
    if len(self.documents) > 1:
      u = int(rng.integers(0, self._starts[-1] - self._lengths[d]))
      if u >= self._starts[d]:
        u += int(self._lengths[d])
      e = int(np.searchsorted(self._starts, u, side='right') - 1)
      start = int(rng.integers(0, max(0, self._lengths[e] - length) + 1))
      return self.documents[e][start : start + length]
    n_starts = int(self._lengths[0]) - length + 1  # valid starts [0, n_starts)
    lo, hi = max(0, s - self._budget - length), min(n_starts, s + avail + self._budget)
    u = int(rng.integers(0, n_starts - (hi - lo)))
    start = u + (hi - lo) if u >= lo else u
    return self.documents[0][start : start + length]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rng = self._rng(step)
    bsz, seq_len = self.batch_size, self.seq_len
    n_random = bsz // 2 + int(bsz % 2 == 1 and rng.random() < 0.5)
    labels = rng.permutation(np.arange(bsz) < n_random).astype(np.int32)  # 1 = random B
    rows = np.full((bsz, seq_len), self.pad_id, np.int32)  # [batch, seq_len]
    types = np.zeros((bsz, seq_len), np.int32)
    lengths = np.zeros(bsz, np.int32)
    for b in range(bsz):
      d = int(np.searchsorted(self._starts, rng.integers(0, self._starts[-1]), side='right') - 1)
      doc, n = self.documents[d], int(self._lengths[d])
      s = int(rng.integers(0, max(0, n - self._budget) + 1))
      avail = min(self._budget, n - s)  # >= 2
      a = int(rng.integers(1, avail))
      seg_a = doc[s : s + a]
      seg_b = self._random_segment(rng, d, s, avail, avail - a) if labels[b] else doc[s + a : s + avail]
      la, lb = len(seg_a), len(seg_b)
      rows[b, 0] = self.cls_id
      rows[b, 1 : 1 + la] = seg_a
      rows[b, 1 + la] = self.sep_id
      rows[b, 2 + la : 2 + la + lb] = seg_b
      rows[b, 2 + la + lb] = self.sep_id
      types[b, 2 + la : 3 + la + lb] = 1
      lengths[b] = 3 + la + lb
    out = mlm_mask(
      rows,
      rng,
      mask_rate=self.mask_rate,
      vocab_size=self.vocab_size,
      mask_id=self.mask_id,
      special_ids=self.special_ids,
    )
    out.update(token_type_ids=types, seq_lengths=lengths, nsp_labels=labels)
    return out


class NSPBatcher(BertBatcher):
  """Sentence-pair batches for next-sentence prediction alone: `BertBatcher` with mask_rate=0 by default."""

  def __init__(
    self, documents, batch_size: int, seq_len: int, *, seed: int = 0, tokenizer, mask_rate: float = 0.0
  ):
    super().__init__(documents, batch_size, seq_len, seed=seed, tokenizer=tokenizer, mask_rate=mask_rate)
