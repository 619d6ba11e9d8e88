r"""What every command line shares (experiments/train.py, sample.py, plot.py): one way to fail.

    error: <what>, <which flag, field or file>, <what would be right>

goes to stderr, and the exit status is 1, or 2 for a usage error (an unknown flag or config field, a flag
value that does not parse, a `--config` file that does not load). No traceback is printed unless
`--verbosity=1` (or more) or the environment variable LSTM_ATTN_TRACEBACK=1 asks for one. The library
itself raises exceptions as usual; only a main runs through `run_main`, which maps ValueError, OSError
(FileNotFoundError, PermissionError, ...), CheckpointError and TrainingDiverged to that line.

    _CONFIG = cli.define_config_file(default='experiments/configs/default.py')
    ...
    if __name__ == '__main__':
      cli.run_main(main)

`define_config_file` is ml_collections' `DEFINE_config_file` that also takes `--config.<field>=None` for
any field (lifting a placeholder such as `data.max_bytes`), and accepts fields it does not know so that
`check_config` names them (with the fields that exist) instead of config_flags' `AttributeError`.

Logging: absl at WARNING unless `--verbosity` is given, and Orbax's own log records (an expected fallback
past a damaged checkpoint, or a failed async write, logs an ERROR with a traceback per thread) are hidden:
what went wrong reaches the main as an exception and is reported once. `--verbosity=0` shows them all.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging

TRACEBACK_ENV = 'LSTM_ATTN_TRACEBACK'
USAGE = 2  # exit status of a usage error (as argparse)
FAILURE = 1

_config_flags: list[str] = []  # names of the flags defined by define_config_file
_define_errors: list[str] = []  # config overrides config_flags rejected while the flag was defined


class _UsageExit(Exception):
  """A usage error found while the flags are parsed."""


def define_config_file(name: str = 'config', *, default: str, help_string: str = 'Experiment config file.'):
  """`config_flags.DEFINE_config_file(name, default)`, with `--<name>.<field>=None` and unknown fields
  left to `check_config` (see the module docstring). Returns the flag holder (`.value`: the ConfigDict)."""
  from ml_collections import config_flags

  _config_flags.append(name)
  try:
    # Overrides of the default file are applied here already, at definition (config_flags reads sys.argv).
    return config_flags.DEFINE_config_file(
      name, default=default, help_string=help_string, lock_config=False, accept_new_attributes=True
    )
  except Exception as e:  # noqa: BLE001  (run_main reports it as a usage error before main runs)
    _define_errors.append(f'--{name}={default} with its overrides: {type(e).__name__}: {_first_line(e)}')
    return None


def run_main(main) -> None:
  """`absl.app.run(main)` with the error style of the module docstring."""
  app.run(_guarded(main), flags_parser=_parse_flags)


def wants_traceback(argv=None) -> bool:
  """LSTM_ATTN_TRACEBACK=1 in the environment, or --verbosity >= 1."""
  if os.environ.get(TRACEBACK_ENV, '') not in ('', '0'):
    return True
  if flags.FLAGS.is_parsed():
    return flags.FLAGS['verbosity'].value >= 1
  for arg in argv or sys.argv:  # flags not parsed (yet): read it off the command line
    m = re.fullmatch(r'--?(?:verbosity|v)=(-?\d+)', arg)
    if m:
      return int(m.group(1)) >= 1
  return False


def fail(message: str, status: int = FAILURE, argv=None):
  """Prints `error: <message>` to stderr (after the current traceback, if one is asked for) and exits."""
  if wants_traceback(argv) and sys.exc_info()[0] is not None:
    traceback.print_exc()
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def check_output_dir(path: str, flag: str) -> None:
  """A folder a main will write into (made if missing) can be written, checked without creating it.

  ValueError for an empty path, NotADirectoryError for a path that is a file or lies under one,
  PermissionError for a folder (the path or its nearest existing parent) this process cannot write
  (permissions, an immutable folder, a read-only file system); each message names `flag` and the path.
  """
  if not path:
    raise ValueError(f'{flag} is empty: give a folder (new, or the workdir of a run to resume).')
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f'{flag}={path} is a file: give a folder (new, or the workdir of a run).')
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f'{flag}={path} lies under {existing}, which is a file: give a folder path.')
  if not os.access(existing, os.W_OK | os.X_OK):
    what = 'is' if existing == os.path.abspath(path) else f'lies in {existing}, which is'
    raise PermissionError(
      f'{flag}={path} {what} not writable (permissions, or a read-only file system): give a folder '
      'this user can write.'
    )


# -----------------------------------------------------------------------------------------------------
# Flags.
# -----------------------------------------------------------------------------------------------------
def _parse_flags(argv: list[str]) -> list[str]:
  if _define_errors:
    fail('; '.join(_define_errors), USAGE, argv)
  argv, nones = _take_none_overrides(argv)
  try:
    rest = flags.FLAGS(argv)
    for name in _config_flags:
      _check_loaded(name, argv)
      _set_none(name, nones.get(name, []))
  except flags.Error as e:
    fail(f'{_first_line(e)} (see --helpshort for the flags).', USAGE, argv)
  except _UsageExit as e:
    fail(str(e), USAGE, argv)
  except Exception as e:  # noqa: BLE001  (only a --config file runs user code while flags are parsed)
    names = ', '.join(f'--{n}={_raw(argv, n)}' for n in _config_flags)
    fail(f'{names} does not load: {type(e).__name__}: {_first_line(e)}; fix the file.', USAGE, argv)
  return rest


def _take_none_overrides(argv):
  """argv without its `--<config>.<path>=None` flags, and {config flag: [paths to set to None]}.

  As for any flag, the last value of a path wins: `=None` then `=5` gives 5.
  """
  kept, nones = [], {}
  for i, arg in enumerate(argv):
    m = re.fullmatch(r'--?(\w+)\.([\w.]+)=None', arg)
    if not (m and m.group(1) in _config_flags):
      kept.append(arg)
      continue
    name, path = m.groups()
    later = re.compile(rf'--?{name}\.{re.escape(path)}=')
    if not any(later.match(a) for a in argv[i + 1 :]):
      nones.setdefault(name, []).append(path)
  return kept, nones


def _set_none(name: str, paths: list[str]) -> None:
  config = flags.FLAGS[name].value
  for path in paths:
    node = config
    *parents, leaf = path.split('.')
    for i, p in enumerate(parents):
      if p not in node:
        raise _UsageExit(f'--{name}.{path}=None: {name}.{".".join(parents[: i + 1])} is not a config field.')
      node = node[p]
    try:
      node[leaf] = None
    except (TypeError, AttributeError) as e:
      raise _UsageExit(f'--{name}.{path}=None: {name}.{path} cannot be None ({_first_line(e)}).') from e


def _check_loaded(name: str, argv) -> None:
  """config_flags defers a missing config file's error to the first use of the config: report it now."""
  import ml_collections

  value = flags.FLAGS[name].value
  if isinstance(value, ml_collections.ConfigDict):
    return
  path = _raw(argv, name).split(':')[0]
  if not os.path.isfile(path):
    raise _UsageExit(
      f'--{name}={path} does not exist; give a config file, e.g. --{name}=experiments/configs/default.py.'
    )
  if type(value).__name__ == '_ErrorConfig':  # config_flags' stand-in for a file that failed to load
    try:
      value.lock  # noqa: B018  (raises the load error)
    except OSError as e:
      raise _UsageExit(f'--{name}={path} does not load: {_first_line(e)}') from e
  raise _UsageExit(
    f'--{name}={path}: get_config() returned {type(value).__name__}, expected an ml_collections.ConfigDict.'
  )


def _raw(argv, name: str) -> str:
  for arg in reversed(argv):
    if arg.startswith((f'--{name}=', f'-{name}=')):
      return arg.split('=', 1)[1]
  return flags.FLAGS[name].default_as_str.strip("'") if name in flags.FLAGS else '?'


# -----------------------------------------------------------------------------------------------------
# Errors raised by main, and logging.
# -----------------------------------------------------------------------------------------------------
def _user_errors() -> tuple[type[BaseException], ...]:
  """ValueError, OSError, and the trainer's CheckpointError and TrainingDiverged where loaded (a main that
  never imported them cannot raise them; plot.py should not pay for importing JAX to fail)."""
  types = [ValueError, OSError]
  for module, cls in (
    ('lstm_attn.training.checkpointing', 'CheckpointError'),
    ('lstm_attn.training.loop', 'TrainingDiverged'),
  ):
    if module in sys.modules:
      types.append(getattr(sys.modules[module], cls))
  return tuple(types)


def _is_usage(e: BaseException) -> bool:
  """An unknown config field (lstm_attn.training.config.UnknownFieldError) is a usage error."""
  config = sys.modules.get('lstm_attn.training.config')
  return config is not None and isinstance(e, config.UnknownFieldError)


def _guarded(main):
  def run(argv):
    _quiet_logs()
    try:
      return main(argv)
    except app.UsageError as e:
      fail(str(e), USAGE)
    except _user_errors() as e:
      fail(_message(e), USAGE if _is_usage(e) else FAILURE)

  return run


def _message(e: BaseException) -> str:
  """The exception's text; an OSError from the system as '<reason>: <file>' (without '[Errno 13]')."""
  if isinstance(e, OSError) and e.strerror and e.filename is not None and len(e.args) == 2:
    where = f'{e.filename}' + (f' -> {e.filename2}' if e.filename2 else '')
    return f'{e.strerror}: {where}'
  return str(e).strip() or type(e).__name__


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  if isinstance(e, KeyError) and e.args:
    text = str(e.args[0]).strip('"')
  return text.splitlines()[0] if text else type(e).__name__


class _NotOrbax(std_logging.Filter):
  """Drops log records Orbax makes about a failure (logged where it happens, or by asyncio for one of its
  tasks whose exception nobody retrieved); the failure itself is raised to the main."""

  _ORBAX = f'{os.sep}orbax{os.sep}'

  def filter(self, record):
    if self._ORBAX in record.pathname:
      return False
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
      if self._ORBAX in tb.tb_frame.f_code.co_filename:
        return False
      tb = tb.tb_next
    return True


def _quiet_logs() -> None:
  if flags.FLAGS['verbosity'].present:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  absl_logging.get_absl_handler().addFilter(_NotOrbax())  # the handler of every logger (absl's, asyncio's)
  # After a failed async save, tensorstore's callbacks find Orbax's event loop closed; Python reports
  # each as an unraisable RuntimeError('Event loop is closed') with a traceback. The failure itself is
  # raised to the main.
  default_hook = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
      return
    default_hook(unraisable)

  sys.unraisablehook = hook
