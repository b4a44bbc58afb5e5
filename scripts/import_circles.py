"""Import circles and long files: ``python scripts/import_circles.py`` lists every strongly connected group of
modules in cxr_edge/, train/, export/ and benchmarks/ (module A imports B and B imports A, directly or
through others; imports inside functions count too) and every tracked .py file over 400 lines. Exit status
1 when either list is not empty."""
import ast, sys, os
from pathlib import Path
root = Path(__file__).resolve().parent.parent; pkgs = ['cxr_edge','train','export','benchmarks']
mods = {}
for p in pkgs:
    for f in (root/p).rglob('*.py'):
        m = '.'.join(f.relative_to(root).with_suffix('').parts)
        if m.endswith('.__init__'): m = m[:-9]
        mods[m] = f
graph = {m:set() for m in mods}
for m,f in mods.items():
    for node in ast.walk(ast.parse(f.read_text())):
        names=[]
        if isinstance(node, ast.Import): names=[a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = m.split('.')
                if f.name != '__init__.py': parts = parts[:-1]
                parts = parts[:len(parts)-node.level+1]
                base = '.'.join(parts + ([base] if base else []))
            names=[base]+[base+'.'+a.name for a in node.names]
        for n in names:
            if n in mods and n != m: graph[m].add(n)
# SCCs
idx={}; low={}; st=[]; on=set(); out=[]; c=[0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v]=low[v]=c[0]; c[0]+=1; st.append(v); on.add(v)
    for w in graph[v]:
        if w not in idx: sc(w); low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop(); on.discard(w); comp.append(w)
            if w==v: break
        if len(comp)>1: out.append(sorted(comp))
for v in graph:
    if v not in idx: sc(v)
for comp in out: print(comp)
print(len(out),'circles')
import subprocess
tracked = subprocess.run(['git', 'ls-files', '*.py'], cwd=root, capture_output=True, text=True).stdout.split()
big = sorted(((len((root / f).read_text().splitlines()), f) for f in tracked if (root / f).is_file()), reverse=True)
big = [b for b in big if b[0] > 400]
for n, f in big: print(f'{n:5d} {f}')
print(len(big), 'files over 400 lines')
sys.exit(1 if out or big else 0)
