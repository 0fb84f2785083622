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
"""
import ast
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
