"""Claims about the import graph the design promises: the four components side by side, talking
only through checkpoints and code dumps (text2dlc.py builds on prior.py's network), plumbing at
the bottom, the built-in data's scoring on top with sample.py, and no cycle."""
import ast
import os

from conftest import ROOT

COMPONENTS = {'tokenizer', 'diffusion', 'prior', 'text2dlc'}
BOTTOM = {'configurator', 'cluster', 'vae', 'codes', 'images'}


def modules():
    """{module name: its file} of every Python file of the repository but the tests."""
    found = {}
    for folder in ['', os.path.join('data', 'shapes')]:
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith('.py') and name != '__init__.py':
                module = os.path.join(folder, name[:-3]).replace(os.sep, '.')
                found[module] = os.path.join(ROOT, folder, name)
    return found


def imports_of(path, known):
    """The repository modules a file imports anywhere in it (inside functions too)."""
    got = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        got |= {n for n in names if n in known}
    return got


def test_the_components_talk_only_through_files_and_import_plumbing_alone():
    known = modules()
    graph = {m: imports_of(path, known) for m, path in known.items()}
    for component in COMPONENTS:
        allowed = BOTTOM | ({'prior'} if component == 'text2dlc' else set())
        assert graph[component] <= allowed, (component, graph[component] - allowed)
    for module in BOTTOM:
        assert graph[module] <= BOTTOM, (module, graph[module])
    assert 'data.shapes.score' in graph['sample']


def test_the_import_graph_has_no_cycle():
    known = modules()
    graph = {m: imports_of(path, known) for m, path in known.items()}
    state = {}
    def visit(m, trail):
        if state.get(m) == 'open':
            raise AssertionError(f"import cycle: {' -> '.join(trail + [m])}")
        if state.get(m) != 'done':
            state[m] = 'open'
            for n in graph[m]:
                visit(n, trail + [m])
            state[m] = 'done'
    for m in graph:
        visit(m, [])
