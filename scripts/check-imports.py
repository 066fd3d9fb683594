#!/usr/bin/env python3
"""No import circles: for each crate, the graph of its top-level modules (a module uses another where its
code names `crate::OTHER`, or `super::OTHER` in a top-level file; comments and test modules left out), and
its strongly connected components. Prints every circle and exits 1 if there is one (scripts/test.sh runs it).
"""
import os, re, sys
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
def top_module(crate_src, path):
    rel = os.path.relpath(path, crate_src)
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ('mod',): parts = parts[:-1]
    if parts[0] in ('lib','main'): return None
    return parts[0]
found = []
for crate in sorted(os.listdir('crates')):
    src = os.path.join('crates', crate, 'src')
    if not os.path.isdir(src): continue
    mods = set()
    files = []
    for root, _, fs in os.walk(src):
        for f in fs:
            if f.endswith('.rs'):
                p = os.path.join(root, f); files.append(p)
                m = top_module(src, p)
                if m: mods.add(m)
    g = {m: set() for m in mods}
    # Names the crate root re-exports from its modules (`pub use module::{A, B};`): `crate::A` uses `module`.
    reexported = {}
    for root_file in ('lib.rs', 'main.rs'):
        path = os.path.join(src, root_file)
        if not os.path.exists(path):
            continue
        for module, names in re.findall(r'pub use (\w+)::\{?([\w, ]+)\}?;', open(path).read()):
            if module in mods:
                for name in names.split(','):
                    reexported[name.strip()] = module
    for p in files:
        m = top_module(src, p)
        if not m: continue
        text = open(p).read()
        # drop test modules at the end of files
        text = re.split(r'#\[cfg\(test\)\]\s*mod tests', text)[0]
        text = '\n'.join(l for l in text.split('\n') if not l.strip().startswith('//'))
        refs = set(re.findall(r'crate::(\w+)', text))
        depth = len(os.path.relpath(p, src).split(os.sep))
        if depth == 1:
            refs |= set(re.findall(r'super::(\w+)', text))
        refs = {reexported.get(r, r) for r in refs}
        for r in refs:
            if r in mods and r != m and not r.endswith('tests') and not m.endswith('tests'):
                g[m].add(r)
    # strongly connected components
    index = {}; low = {}; stack = []; on = set(); out = []; c = [0]
    def sc(v):
        index[v] = low[v] = c[0]; c[0] += 1; stack.append(v); on.add(v)
        for w in g[v]:
            if w not in index: sc(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in sorted(g):
        if v not in index: sc(v)
    for comp in out:
        edges = [f"{a}->{b}" for a in comp for b in sorted(g[a]) if b in comp]
        print(f"{crate}: import circle among {', '.join(comp)}: {' '.join(edges)}")
        found.append(comp)
sys.exit(1 if found else 0)
