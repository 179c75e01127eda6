import re, sys, os
src, dst = sys.argv[1], sys.argv[2]
s = open(src).read()
s = re.sub(r'extern __shared__ (\w+) (\w+)\[\];', r'\1* \2 = emu::dyn_smem<\1>();', s)
def launch(m):
    name, cfg = m.group(1), m.group(2)
    return f'emu::launch(emu::Cfg({cfg}), [&](auto... a_) {{ {name}(a_...); }}, '
s, n = re.subn(r'([\w:]+(?:<[\w:, ]+>)?)<<<(.+?)>>>\(', launch, s)
os.makedirs(os.path.dirname(dst), exist_ok=True)
open(dst, 'w').write(s)
print(src, n, 'launches', file=sys.stderr)
