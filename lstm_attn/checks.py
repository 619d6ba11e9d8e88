"""Argument checks shared by the library's boundaries: the config dataclasses (models/specs.py), the public
functional ops (`lstm_attn.lstm.lstm`), the public modules a user builds directly (`LSTM`,
`MultiHeadAttention`, `SequenceClassifier`) and the data batchers. Layers built from an already-checked
config trust their inputs and check nothing again.
"""

from __future__ import annotations

import numbers


def check_rate(name: str, value, *, closed: bool = False) -> float:
  """`value` as a float if it is a rate in [0, 1) (a dropout rate), or in [0, 1] when `closed` (a
  probability); otherwise a ValueError naming `name`, the value and the interval."""
  interval = '[0, 1]' if closed else '[0, 1)'
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if ok:
    ok = 0.0 <= float(value) <= 1.0 if closed else 0.0 <= float(value) < 1.0
  if not ok:
    raise ValueError(f'{name} must be a number in {interval}, got {value!r}.')
  return float(value)
