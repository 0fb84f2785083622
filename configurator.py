"""
The one shared helper: apply a config file and --key=value overrides to a script's flat
config block.

Every script keeps its settings as module-level globals at the top, then snapshots them:

    CONFIG = {k: v for k, v in globals().items() if k in config_keys}

and, when run as a program, does

    cfg = configure(CONFIG, sys.argv[1:])

Arguments are applied left to right:
  path/to/file.py   a plain-Python file of assignments (`batch_size = 64`), executed;
                    the names it assigns override the defaults
  --key=value       one override; the value is parsed as a Python literal when it is one
                    (`--lr=3e-4`, `--compile=True`), else kept as a string (`--out_dir=out`);
                    a string key keeps the text as written (`--sources=3,17`, `--prompts=42`)

A key that is not in the config block, or a value whose type differs from the default's,
is an error: a typo must never silently train the wrong model. An int may be given where a
float is expected, and None defaults accept anything.

Run as a program, a script hands its config block, sys.argv and its main to command_line:
--help prints the script's purpose, modes and config keys (defaults and comments read from its
source), and a user's mistake, raised anywhere as a UserError, ends the run with one line,
`error: ...`, exit status 2, no traceback. A bug keeps its traceback.
"""
import ast
import math
import os
import re
import sys
import types


def _checked(defaults, key, value, source, text=None):
    if key not in defaults:
        known = ', '.join(sorted(defaults))
        raise ValueError(f"{source}: unknown config key '{key}'. Known keys: {known}")
    default = defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and not isinstance(value, str) and text is not None:
        return text         # `3,17` or `207` is what a string key means, not a tuple or an int
    if type(value) is not type(default):
        raise TypeError(f"{source}: config key '{key}' expects {type(default).__name__} "
                        f"(default {default!r}), got {type(value).__name__} {value!r}")
    return value


def configure(defaults, argv):
    """Return a new dict: `defaults` with the config files and --key=value in argv applied."""
    cfg = dict(defaults)
    for arg in argv:
        if arg.startswith('--'):
            if '=' not in arg:
                raise ValueError(f"override '{arg}' must look like --key=value")
            key, text = arg[2:].split('=', 1)
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            cfg[key] = _checked(defaults, key, value, f"override {arg}", text)
        else:
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise FileNotFoundError(f"config file '{arg}' cannot be read: {e}") from None
            scope = {}
            exec(compile(source, arg, 'exec'), scope)
            for key, value in scope.items():
                if key.startswith('_') or isinstance(value, types.ModuleType):
                    continue
                cfg[key] = _checked(defaults, key, value, f"config file {arg}")
    return cfg


# -----------------------------------------------------------------------------
# What every script does when run: --help, and user errors as one line

class UserError(ValueError):
    """A user's mistake (a bad key or value, a missing, corrupt or mismatched file): when it
    reaches command_line it is printed as one line, `error: ...`, and the script exits with
    status 2 and no traceback. Its message names the key or file, the value and the fix.
    Anything else raised is a bug and keeps its traceback."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named (or the run needs) is not there."""


USER_ERROR_STATUS = 2           # as argparse and most command-line tools


def comment_of(line):
    """The text of a line's # comment outside quotes, or ''."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in '\'"':
            quote = c
        elif c == '#':
            return line[i + 1:].strip()
    return ''


def config_comments(source):
    """{name: comment} of a script's flat config block: the comment of each top-level
    `name = value` line (the first one of that name), with the comment-only lines indented below
    it that continue it."""
    lines = source.splitlines()
    comments = {}
    for i, line in enumerate(lines):
        m = re.match(r'([A-Za-z_]\w*)\s*=(?!=)', line)
        if not m or m.group(1) in comments:
            continue
        text = [comment_of(line)]
        for more in lines[i + 1:]:
            if not re.match(r'\s+#', more):
                break
            text.append(more.strip()[1:].strip())
        comments[m.group(1)] = ' '.join(t for t in text if t)
    return comments


def help_text(path, defaults):
    """A script's --help: the first line of its docstring (its purpose), its modes (the docstring's
    'Modes' block, else its usage lines), then each config key with its default and comment."""
    with open(path) as f:
        source = f.read()
    doc = (ast.get_docstring(ast.parse(source)) or '').splitlines()
    first = ' '.join(doc[:doc.index('')] if '' in doc[1:] else doc).split() or [path]
    purpose = re.split(r'(?<=\.)\s(?=[A-Z])', ' '.join(first))[0]
    start = next((i for i, line in enumerate(doc) if re.match(r'(Modes|Usage)\b', line)), None)
    if start is not None:
        modes = [doc[start]]
        for line in doc[start + 1:]:
            if line and not line[0].isspace():
                break
            modes.append(line)
    else:
        modes = ['Usage:'] + [line for line in doc if line.lstrip().startswith(('python ', 'torchrun '))]
    while modes and not modes[-1].strip():
        modes.pop()
    name = os.path.relpath(path, os.path.dirname(os.path.abspath(__file__)))
    out = [purpose, ''] + (modes + [''] if len(modes) > 1 else [])
    if defaults:
        comments = config_comments(source)
        out.append(f"config keys (python {name} [config.py ...] [--key=value ...]; a config file "
                   "sets the same names):")
        for key, value in defaults.items():
            setting = f"  --{key}={value!r}"
            comment = comments.get(key, '')
            out.append(f"{setting:<36} {comment}".rstrip() if comment else setting)
    return '\n'.join(out).rstrip() + '\n'


def command_line(defaults, argv, main, path):
    """Run a script: --help (or -h) prints help_text and exits 0; otherwise main(the config), where
    a UserError (a bad config key or value included) ends the run with one line on stderr,
    `error: ...`, and exit status 2."""
    if '--help' in argv or '-h' in argv:
        print(help_text(path, defaults), end='')
        sys.exit(0)
    try:
        try:
            cfg = configure(defaults, argv)
        except (ValueError, TypeError, OSError) as e:       # configure raises only user errors
            raise UserError(str(e)) from None
        return main(cfg)
    except UserError as e:
        message = str(e)
        if 'Original Traceback' in message:     # raised in a DataLoader worker: its last line
            message = message.rstrip().splitlines()[-1].split(': ', 1)[-1]
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_STATUS)


def check_counts(cfg, *keys, minimum=1):
    """Counts and sizes (batch sizes, steps, samples) must be whole numbers >= minimum: checked
    before anything is written, so a bad value changes nothing."""
    for key in keys:
        if cfg[key] < minimum:
            raise UserError(f"--{key}={cfg[key]} must be at least {minimum}")


def check_finite(cfg, *keys, low=float('-inf'), high=float('inf')):
    """Scales and rates must be finite numbers in [low, high]."""
    for key in keys:
        value = cfg[key]
        if not math.isfinite(value) or not low <= value <= high:
            raise UserError(f"--{key}={value} must be a finite number in [{low}, {high}]")
