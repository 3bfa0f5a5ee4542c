"""The code's layout rules, read from the source with ``ast`` (nothing is imported): no import cycle among lt_timm's
modules (imports inside functions included), no ``_private`` name imported from another lt_timm module, no function
over 60 lines except argparse tables (functions that are mostly ``add_argument`` calls), and detection below its
command line reads typed settings, not the flags' argparse Namespace."""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

from conftest import REPO

PACKAGE = REPO / 'lt_timm'
MAX_LINES = 60
# Functions over the limit, each to be shortened by the change that owns its file (not a licence for new ones).
LONG_FUNCTION_EXCEPTIONS = set()


def module_files(package: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted(package.rglob('*.py')):
        parts = list(path.relative_to(package.parent).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        out['.'.join(parts)] = path
    return out


def _imported(module: str, path: Path, node: ast.AST, modules: Dict[str, Path]) -> List[Tuple[str, str]]:
    """(imported module, imported name or '') of one import statement, lt_timm modules only; a ``from`` import of
    a submodule counts as an import of that submodule."""
    if isinstance(node, ast.Import):
        return [(a.name, '') for a in node.names if a.name.split('.')[0] == PACKAGE.name]
    base = node.module or ''
    if node.level:
        parts = module.split('.') if path.name == '__init__.py' else module.split('.')[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = '.'.join(parts + ([node.module] if node.module else []))
    if base.split('.')[0] != PACKAGE.name:
        return []
    return [(f'{base}.{a.name}', '') if f'{base}.{a.name}' in modules else (base, a.name) for a in node.names]


def import_graph(package: Path) -> Tuple[Dict[str, Set[str]], List[str]]:
    """(module -> the lt_timm modules it imports anywhere in its code, ``_private`` names imported across modules)."""
    modules = module_files(package)
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    private = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target, name in _imported(module, path, node, modules):
                while target not in modules and '.' in target:
                    target = target.rsplit('.', 1)[0]
                if target != module:
                    graph[module].add(target)
                    if name.startswith('_'):
                        private.append(f'{module} imports {name} from {target}')
    return graph, private


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle (its modules, the first repeated at the end), or [] when there is none."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return []

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return []


def _is_argparse_table(fn: ast.FunctionDef) -> bool:
    """Most of its statements add arguments (``add_argument``, ``add_argument_group``, ``add_shared_options``)."""
    adds = 0
    for stmt in fn.body:
        call = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign)) else None
        if isinstance(call, ast.Call):
            name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, 'id', '')
            adds += name in ('add_argument', 'add_argument_group', 'add_shared_options')
    return adds * 10 >= len(fn.body) * 7


def long_functions(package: Path, limit: int = MAX_LINES) -> List[Tuple[str, str, int]]:
    """(file, qualified name, lines) of every function over ``limit`` lines that is not an argparse table."""
    out = []
    for path in sorted(package.rglob('*.py')):
        rel = str(path.relative_to(package.parent))

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > limit and not _is_argparse_table(child):
                        out.append((rel, prefix + child.name, lines))
                    walk(child, prefix + child.name + '.')
                elif isinstance(child, ast.ClassDef):
                    walk(child, prefix + child.name + '.')
        walk(ast.parse(path.read_text()), '')
    return out


def namespace_uses(package: Path) -> List[str]:
    """Where a module of ``package`` imports argparse, names ``Namespace`` or has a parameter called ``args``."""
    out = []
    for path in sorted(package.rglob('*.py')):
        rel = str(path.relative_to(package.parent))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == 'argparse' for a in node.names) or \
                    isinstance(node, ast.ImportFrom) and node.module == 'argparse':
                out.append(f'{rel}:{node.lineno} imports argparse')
            elif 'Namespace' in (getattr(node, 'id', None), getattr(node, 'attr', None)):
                out.append(f'{rel}:{node.lineno} names Namespace')
            elif isinstance(node, ast.arg) and node.arg == 'args':
                out.append(f'{rel}:{node.lineno} takes args')
    return out


def test_no_import_cycle_among_modules():
    graph, _ = import_graph(PACKAGE)
    assert len(graph) > 30 and 'lt_timm.cli.train' in graph['lt_timm.cli.parity_doc']  # the graph is the real one
    assert find_cycle(graph) == []


def test_no_private_name_imported_across_modules():
    assert import_graph(PACKAGE)[1] == []


def test_no_long_functions_but_argparse_tables():
    found = long_functions(PACKAGE)
    assert {(f, n) for f, n, _ in found} <= LONG_FUNCTION_EXCEPTIONS, found
    tables = [n for f, n, _ in long_functions(PACKAGE, limit=0) if 'build_parser' in n]
    assert not tables  # build_parser functions are long, and recognised as argparse tables


def test_detection_reads_typed_settings_not_the_flags():
    """Below lt_timm/cli/detection.py, detection reads lt_timm.config's frozen dataclasses (DetectionConfig): no
    module of lt_timm/detection imports argparse, names a Namespace or takes ``args``."""
    assert (PACKAGE / 'detection' / 'train.py').is_file()
    assert namespace_uses(PACKAGE / 'detection') == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """On a small package with a (lazy) cycle, a private import and a long function, each check reports it."""
    pkg = tmp_path / PACKAGE.name
    (pkg / 'sub').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'sub' / '__init__.py').write_text('')
    (pkg / 'a.py').write_text('from .sub.b import helper, _hidden\n')
    (pkg / 'sub' / 'b.py').write_text('def helper():\n    from ..a import x\n    return x\n\n\n_hidden = 1\n')
    (pkg / 'c.py').write_text('def long():\n' + '    x = 1\n' * 70 + '\n\ndef table(p):\n'
                              + "    p.add_argument('--x')\n" * 70)
    (pkg / 'sub' / 'd.py').write_text('import argparse\n\n\ndef run(args):\n'
                                      '    return argparse.Namespace(lr=args.lr)\n')
    graph, private = import_graph(pkg)
    assert find_cycle(graph) == ['lt_timm.a', 'lt_timm.sub.b', 'lt_timm.a']
    assert private == ['lt_timm.a imports _hidden from lt_timm.sub.b']
    assert [(n, lines) for _, n, lines in long_functions(pkg)] == [('long', 71)]
    assert sorted(namespace_uses(pkg)) == ['lt_timm/sub/d.py:1 imports argparse', 'lt_timm/sub/d.py:4 takes args',
                                           'lt_timm/sub/d.py:5 names Namespace']
