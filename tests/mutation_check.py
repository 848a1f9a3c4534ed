"""A small mutation check of the core's wiring: each mutant is a one-line change a refactoring
could make by mistake; the fast tests that cover that part must fail on it.

    python tests/mutation_check.py            # every mutant, ~5 min on 2 cores
    python tests/mutation_check.py global     # the mutants whose name contains 'global'

Each mutant is applied to a copy of the file's text, the tests run in a subprocess, and the
file is restored from that copy whatever happens. Prints killed / SURVIVED per mutant and
exits 1 if any survived.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_wiring.py", "tests/test_schedule.py", "tests/test_selection.py",
         "tests/test_optimizer.py", "tests/test_methods.py", "tests/test_hooks.py",
         "tests/test_families.py", "tests/test_loop_edges.py", "tests/test_structure.py",
         "tests/test_drop_in.py"]

#: name -> (file, text, replacement)
MUTANTS: dict[str, tuple[str, str, str]] = {
    "global scope ranks each layer alone": (
        "prune_plugin/methods.py",
        '        groups = [[sel] for sel in selectables] if self.scope == "local" \\',
        '        groups = [[sel] for sel in selectables] if True \\'),
    "schedule read a step late": (
        "prune_plugin/methods.py", "        remaining = self.remaining(step)",
        "        remaining = self.remaining(max(0, step - 1))"),
    "Eq. 5 numerator t - t_i - t_f (the paper's misprint)": (
        "prune_plugin/schedule.py", "(step - warmup_steps) / span",
        "(step - warmup_steps - cooldown_steps) / span"),
    "masks refreshed every step": (
        "prune_plugin/pruner.py", "        if self.step_count % self.policy.mask_update_every == 0:",
        "        if True:"),
    "a skipped inner step still counts": (
        "prune_plugin/optimizer.py", "if self.counts_steps and (self._inner_stepped or not hooked):",
        "if self.counts_steps:"),
    "detach leaves the state-dict hooks": (
        "prune_plugin/hooks.py", "        for handle in self._handles:\n            handle.remove()",
        "        for handle in self._handles:\n            pass"),
    "scores' lr does not follow the weights'": (
        "prune_plugin/optimizer.py", "        self.follow_weight_lr()\n", "\n"),
    "qkv_stacked query heads paired modulo": (
        "prune_plugin/families.py", "q = torch.arange(query_heads * head_dim) // (head_dim * group)",
        "q = torch.arange(query_heads * head_dim) // head_dim % units"),
    "gate/up halves paired as neighbours": (
        "prune_plugin/families.py", "        return torch.arange(lines) % units",
        "        return torch.arange(lines) // 2"),
    "head counts not rescaled at shrink": (
        "prune_plugin/structure.py", "    apply_attributes(parent, changed)\n",
        "    changed = {}\n"),
    "L0's sampled gates ignore the Top-v mask": (
        "prune_plugin/methods.py",
        "        mask = lin(layer.current_mask() if self.masked else None)",
        "        mask = None"),
    "the penalty's controller ignored": (
        "prune_plugin/methods.py",
        "        return None if controller is None else controller.factor(candidates, step)",
        "        return None"),
    "kept counts ignore closed L0 gates": (
        "prune_plugin/pruner.py", "                opened = gate.open_where(imp, phase)",
        "                opened = None"),
    "the threshold's weights not added to the Top-v floor": (
        "prune_plugin/methods.py",
        "                    sel.mask.logical_or_(threshold_mask(importance(sel), tau))",
        "                    pass"),
    "the gate phase never changes": (
        "prune_plugin/pruner.py", "        if phase != self.state.phase:",
        "        if False:"),
    "tied weights not refused": (
        "prune_plugin/pruner.py", "        if others:\n            tied = others[0]",
        "        if False:\n            tied = others[0]"),
}


def run(name: str, file: str, old: str, new: str) -> bool:
    path = ROOT / file
    original = path.read_text()
    if original.count(old) != 1:
        raise SystemExit(f"mutant {name!r}: its text is not found once in {file}; update it")
    try:
        path.write_text(original.replace(old, new))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                                 "no:cacheprovider", *TESTS], cwd=ROOT, capture_output=True,
                                text=True)
    finally:
        path.write_text(original)
    return result.returncode != 0


def main() -> int:
    chosen = [n for n in MUTANTS if len(sys.argv) < 2 or sys.argv[1] in n]
    survived = []
    for name in chosen:
        killed = run(name, *MUTANTS[name])
        print(f"{'killed  ' if killed else 'SURVIVED'} {name}", flush=True)
        if not killed:
            survived.append(name)
    print(f"{len(chosen) - len(survived)}/{len(chosen)} killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
