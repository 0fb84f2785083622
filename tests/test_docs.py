"""Claims about the commands in README.md and docs/*.md: each one a reader can copy runs a script
that exists, with config files that exist and set only the script's keys, and --key=value
overrides the script has; each `make X` names a Makefile target. Nothing runs: a script's keys
are the dict it hands configurator.configure (its CONFIG block, or a dict written in the call), or,
for a script that reads sys.argv itself, the arguments it compares sys.argv with."""
import ast
import functools
import glob
import importlib
import importlib.util
import os
import re
import shlex
import types
from collections import namedtuple

import pytest

from conftest import ROOT

DOCS = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(f'{ROOT}/docs/*.md'))

Command = namedtuple('Command', 'where text argv')      # where: 'README.md:164'
PLACEHOLDER_SCRIPT = re.compile(r'^[A-Z]\.py$|<')      # `python X.py ...` shows the syntax
START = re.compile(r'(\w+=\S*\s+)*(python3?|\.venv/bin/python|torchrun|srun|make)\s')


# -- finding the commands ---------------------------------------------------------------------

def strip_comment(line):
    """The line up to a shell comment: a # that starts a word, outside quotes."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in '\'"':
            quote = c
        elif c == '#' and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def split_chain(text):
    """The simple commands of a shell line: split at &&, ||, ;, & and | (a pipe's right side is
    a command of its own). Each is a list of words; `...` and the brackets of `[--opt=x]` go."""
    lexer = shlex.shlex(strip_comment(text), posix=True, punctuation_chars='|&;')
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token and set(token) <= set('|&;'):
            commands.append(words)
            words = []
        elif token != '...':
            words.append(token[1:-1] if token.startswith('[-') and token.endswith(']') else token)
    return [w for w in commands + [words] if w]


def is_command(words):
    """python ... / .venv/bin/python ... / [srun] torchrun ... script.py / make target."""
    while words and re.fullmatch(r'\w+=\S*', words[0]):          # VAR=value python ...
        words = words[1:]
    if not words or len(words) < 2:
        return False
    if words[0] in ('torchrun', 'srun'):
        return any(w.endswith('.py') for w in words)
    return words[0] in ('python', 'python3', '.venv/bin/python', 'make')


def commands_in(text, name):
    """The commands in a markdown text: lines of fenced blocks (a trailing backslash joins the
    next line) and inline code spans (which may wrap a line), each with its file:line."""
    found, prose, lines = [], [], text.split('\n')
    fenced, i = False, 0
    while i < len(lines):
        line, start = lines[i], i + 1
        if line.lstrip().startswith('```'):
            fenced = not fenced
            prose.append('')
        elif fenced:
            while line.rstrip().endswith('\\') and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + ' ' + lines[i].strip()
                prose.append('')
            found.append((start, line.strip()))
            prose.append('')
        else:
            prose.append(line)
        i += 1
    prose = '\n'.join(prose)                     # fences blanked, so the line numbers hold
    for span in re.finditer(r'`((?:[^`\n]|\n(?!\s*\n))+)`', prose):
        found.append((prose.count('\n', 0, span.start()) + 1, ' '.join(span.group(1).split())))
    commands = []
    for n, line in sorted(found):
        script = re.match(r'(\w+\.py) --\w', line)      # `bench.py --component=dit ...` in a table
        if script and os.path.exists(os.path.join(ROOT, script.group(1))):
            line = 'python ' + line
        if not START.match(line):
            continue
        try:
            chain = split_chain(line)
        except ValueError:                       # a quote left open: no shell would run it
            commands.append(Command(f'{name}:{n}', line, None))
            continue
        commands += [Command(f'{name}:{n}', shlex.join(w), w) for w in chain if is_command(w)]
    return commands


def doc_commands():
    return [c for doc in DOCS for c in commands_in(open(os.path.join(ROOT, doc)).read(), doc)]


# -- what the code accepts ----------------------------------------------------------------------

@functools.cache
def make_targets():
    targets = set()
    for line in open(os.path.join(ROOT, 'Makefile')):
        rule = re.match(r'([^\s#][^:=]*):(?!=)', line)
        if rule:
            targets.update(rule.group(1).split())
    return targets


@functools.cache
def options_of(script):
    """('keys', names) for a script that hands sys.argv to configurator.configure: the keys of
    the dict it hands over; ('flags', words) for one that reads sys.argv itself: the literal
    --words it compares sys.argv with (its other arguments are positional, not checked)."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, 'id', None) in ('configure',
                                                                             'command_line') \
                and 'sys.argv' in ast.unparse(node):
            defaults = node.args[0]
            if isinstance(defaults, ast.Call) and defaults.func.id == 'dict':   # dict(k=v, ..)
                return 'keys', frozenset(kw.arg for kw in defaults.keywords)
            module = importlib.import_module(script[:-3].replace('/', '.'))      # CONFIG
            return 'keys', frozenset(getattr(module, defaults.id))
    flags = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and 'sys.argv' in ast.unparse(node):
            flags |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)
                      and isinstance(c.value, str) and c.value.startswith('-')}
    return 'flags', frozenset(flags)


def config_file_keys(path):
    """The names a config file sets, as configurator.configure reads them."""
    scope = {}
    exec(compile(open(path).read(), path, 'exec'), scope)
    return {k for k, v in scope.items()
            if not k.startswith('_') and not isinstance(v, types.ModuleType)}


# -- checking one command ----------------------------------------------------------------------

def check(words):
    """What is wrong with one command (a list of words): [] if nothing, else one line each.
    Raises pytest.skip for a command that only shows the syntax (`python X.py ...`)."""
    while re.fullmatch(r'\w+=\S*', words[0]):
        words = words[1:]
    if words[0] == 'make':
        return [f"no Makefile target '{t}'" for t in words[1:]
                if not t.startswith('-') and '=' not in t and t not in make_targets()]
    if words[0] in ('torchrun', 'srun'):         # the launcher's options come before the script
        words = ['python'] + words[next(i for i, w in enumerate(words) if w.endswith('.py')):]
    while len(words) > 1 and words[1].startswith('-') and words[1] != '-m':     # python -u ..
        words = words[:1] + words[2:]
    script, args = words[1], words[2:]
    if script == '-m':
        found = importlib.util.find_spec(args[0]) if args else None
        return [] if found else [f"no module '{args[0] if args else ''}' to run with -m"]
    if PLACEHOLDER_SCRIPT.search(script):
        pytest.skip(f'{script} is a placeholder: the line shows the syntax, not a run')
    if not os.path.isfile(os.path.join(ROOT, script)):
        return [f"no script '{script}'"]
    kind, known = options_of(script)
    problems = []
    for arg in args:
        if arg.startswith('--'):
            key = arg[2:].split('=', 1)[0] if kind == 'keys' else arg
            if key not in known:
                problems.append(f"{script} has no {'key' if kind == 'keys' else 'option'} "
                                f"'{key}' (in {arg})")
            elif kind == 'keys' and '=' not in arg:
                problems.append(f"'{arg}': configurator.py takes --key=value only")
        elif kind == 'keys':
            path = os.path.join(ROOT, arg)
            if not os.path.isfile(path):
                problems.append(f"no config file '{arg}' (a value with spaces left unquoted?)")
                continue
            problems += [f"config file {arg} sets '{key}', which {script} does not have"
                         for key in sorted(config_file_keys(path) - known)]
    return problems


# -- the claims -------------------------------------------------------------------------------

COMMANDS = doc_commands()


def test_the_docs_hold_commands_of_every_kind():
    """Not vacuous: the extraction finds the documented commands."""
    assert len(COMMANDS) >= 30, [c.where for c in COMMANDS]
    starts = {c.argv[0] for c in COMMANDS if c.argv}
    assert {'python', 'torchrun', 'make'} <= starts, starts


@pytest.mark.parametrize('command', COMMANDS, ids=[c.where for c in COMMANDS])
def test_every_documented_command_fits_the_code(command):
    problems = check(command.argv) if command.argv else ['a quote is never closed']
    assert not problems, f"{command.where}: {command.text}\n  " + '\n  '.join(problems)


FAKE_DOC = """\
Prose with `python prior.py config/prior_shapes.py
--lerning_rate=1e-3` in a span that wraps.

```
python diffusion.py config/diffusion_shapes.py \\
    --mode=recon [--split=<split>]   # the DiT's reconstructions
python nope.py && make demo && make nope
python data/shapes/score.py --codes_dir=out --image=x.npz
torchrun --nproc_per_node=8 sample.py --prompts=a red circle|a blue square
python data/shapes/results.py --real out/real --only=oracle --reprot
```
"""


def test_the_checker_catches_what_is_wrong(tmp_path):
    """The extraction and the checker on a made-up page: each mistake named, at its line."""
    found = [(c.where, check(c.argv)) for c in commands_in(FAKE_DOC, 'fake.md')]
    assert found == [
        ('fake.md:1', ["prior.py has no key 'lerning_rate' (in --lerning_rate=1e-3)"]),
        ('fake.md:5', []),
        ('fake.md:7', ["no script 'nope.py'"]),
        ('fake.md:7', []),
        ('fake.md:7', ["no Makefile target 'nope'"]),
        ('fake.md:8', ["data/shapes/score.py has no key 'image' (in --image=x.npz)"]),
        ('fake.md:9', ["no config file 'red' (a value with spaces left unquoted?)",
                       "no config file 'circle' (a value with spaces left unquoted?)"]),
        ('fake.md:10', ["data/shapes/results.py has no option '--reprot' (in --reprot)"]),
    ]
    bad = tmp_path / 'bad.py'
    bad.write_text("import math\nbatch_size = 64\nlerning_rate = 1e-3\n")
    assert check(['python', 'prior.py', str(bad), '--mode']) == [
        f"config file {bad} sets 'lerning_rate', which prior.py does not have",
        "'--mode': configurator.py takes --key=value only"]
    assert commands_in("`python prior.py --prompts='a red`", 'x.md')[0].argv is None   # no shell
