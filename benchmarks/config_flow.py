"""How often following the config through a run re-enters a module: this tree vs a baseline commit.

Issue 21's measure of the floor plan, read from the source alone (stdlib `ast`, nothing imported or
run). Starting at `run_loop(cfg)`, it follows, in source order, every call to a function of
`pipeline/` that receives the config: `cfg` or an attribute or item of it ("strict"), or also any
local computed from those ("broad", which follows the run directory and everything derived from
the config too). Each such call is followed into its callee with the parameters that received the
config. The modules entered form a path; calls that stay in one module are one stop. A return is
a stop in a module the path has already left; a re-entry is a return into a module none of the
callers on the way there is in (the config comes back into it from elsewhere, not back to a
caller that goes on with its next step). A function already on the path is not entered again
(recursion); a function called twice is followed twice, as the run does.

Calls it cannot resolve statically (methods on objects, functions passed as values, Ray actors)
are not followed, in either tree alike.

Run: python benchmarks/config_flow.py [--baseline REV] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import subprocess
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "50c7fc6"  # the last commit before issue 21's restructuring
Function = tuple[str, str]  # (module, function name); a class stands for its __init__


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pipeline_imports(nodes: list[ast.stmt], modules: set[str]) -> dict[str, tuple[str, ...]]:
    """Local name -> ("module", name) or ("function", module, name) for imports from pipeline."""
    names: dict[str, tuple[str, ...]] = {}
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names[alias.asname or alias.name] = ("module", full) if full in modules else \
                    ("function", node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pipeline"):
                    names[alias.asname or alias.name] = ("module", alias.name)
    return names


@dataclass
class Source:
    """The functions of one tree's pipeline/ package and each module's imports."""

    root: Path
    functions: dict[Function, ast.FunctionDef] = field(default_factory=dict)
    imports: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        trees = {module_name(f, self.root): ast.parse(f.read_text()) for f in (self.root / "pipeline").rglob("*.py")}
        for module, tree in trees.items():
            self.imports[module] = pipeline_imports(tree.body, set(trees))
            for node in tree.body:
                if isinstance(node, ast.FunctionDef):
                    self.functions[(module, node.name)] = node
                elif isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                            self.functions[(module, node.name)] = item

    def find(self, name: str) -> Function:
        (found,) = [f for f in self.functions if f[1] == name]
        return found

    def defined(self, module: str, name: str, hops: int = 0) -> Function | None:
        """Where `module.name` is defined, through re-exports."""
        if (module, name) in self.functions:
            return module, name
        target = self.imports.get(module, {}).get(name)
        if target and target[0] == "function" and hops < 5:
            return self.defined(target[1], target[2], hops + 1)
        return None

    def callee(self, caller: Function, call: ast.Call, local: dict[str, tuple[str, ...]]) -> Function | None:
        names = {**self.imports[caller[0]], **local}
        f = call.func
        if isinstance(f, ast.Name):
            target = names.get(f.id)
            if target and target[0] == "function":
                return self.defined(target[1], target[2])
            return (caller[0], f.id) if (caller[0], f.id) in self.functions else None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            target = names.get(f.value.id)
            if target and target[0] == "module":
                return self.defined(target[1], f.attr)
        return None


def carries(expr: ast.expr, held: set[str], broad: bool) -> bool:
    """Whether an argument passes the config on: rooted at a held name (strict), or naming one (broad)."""
    if broad:
        return any(isinstance(n, ast.Name) and n.id in held for n in ast.walk(expr))
    while isinstance(expr, (ast.Attribute, ast.Subscript)):
        expr = expr.value
    return isinstance(expr, ast.Name) and expr.id in held


def follow(source: Source, entry: Function, held: set[str], broad: bool) -> list[tuple[Function, set[str]]]:
    """Every function the config reaches from `entry`, in the order the source calls them, each
    with the modules of the callers on the way to it."""
    path: list[tuple[Function, set[str]]] = [(entry, set())]

    def visit(function: Function, held: set[str], chain: list[Function]) -> None:
        node = source.functions[function]
        local = pipeline_imports([n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))],
                                 set(source.imports))
        held = set(held)
        steps = sorted((n for n in ast.walk(node) if isinstance(n, (ast.Call, ast.Assign))),
                       key=lambda n: (n.lineno, n.col_offset))
        for step in steps:
            if isinstance(step, ast.Assign):
                if broad and carries(step.value, held, broad):
                    held |= {n.id for t in step.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
                continue
            callee = source.callee(function, step, local)
            if callee is None:
                continue
            spec = source.functions[callee].args
            params = [a.arg for a in spec.posonlyargs + spec.args]
            params = params[1:] if params[:1] == ["self"] else params
            given = {params[i] for i, a in enumerate(step.args) if i < len(params) and carries(a, held, broad)}
            given |= {k.arg for k in step.keywords if k.arg and carries(k.value, held, broad)}
            if given:
                path.append((callee, {m for m, _ in chain}))
                if callee not in chain:
                    visit(callee, given, [*chain, callee])

    visit(entry, held, [entry])
    return path


def measure(source: Source, broad: bool) -> dict:
    calls = [(module, callers) for (module, _), callers in follow(source, source.find("run_loop"), {"cfg"}, broad)]
    stops = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1][0] != c[0]]
    entered = Counter(m for m, _ in stops)
    reentries = sum(m in {n for n, _ in stops[:i]} and m not in callers for i, (m, callers) in enumerate(stops))
    return {"calls": len(calls), "stops": len(stops), "modules": len(entered),
            "returns": len(stops) - len(entered), "re-entries": reentries, "entries": dict(entered.most_common()),
            "path": [m.removeprefix("pipeline.") for m, _ in stops]}


def baseline_tree(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "pipeline"], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help=f"the git revision to compare with ({BASELINE})")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours, baseline = Source(ROOT), Source(baseline_tree(args.baseline, Path(tmp)))
    figures = {mode: {"ours": measure(ours, mode == "broad"), "baseline": measure(baseline, mode == "broad")}
               for mode in ("strict", "broad")}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"following the config from run_loop: this tree ({head.stdout.strip()}) vs {args.baseline}")
    print(f"{'':8} {'':>10} {'ours':>6} {'baseline':>9} {'ratio':>6}")
    for mode, pair in figures.items():
        for key in ("calls", "stops", "modules", "returns", "re-entries"):
            ours, theirs = pair["ours"][key], pair["baseline"][key]
            ratio = f"{ours / theirs:6.2f}" if theirs else f"{'-':>6}"
            print(f"{mode:8} {key:>10} {ours:6d} {theirs:9d} {ratio}")
    for mode, pair in figures.items():
        print(f"\n{mode}, modules entered more than once (ours):",
              ", ".join(f"{m.removeprefix('pipeline.')} {n}" for m, n in pair["ours"]["entries"].items() if n > 1))
    print(f"\nstrict path (ours): {' -> '.join(figures['strict']['ours']['path'])}")
    if args.json:
        args.json.write_text(json.dumps({"baseline": args.baseline, "head": head.stdout.strip(), **figures}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
