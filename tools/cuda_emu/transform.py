import re, sys, os
src, dst = sys.argv[1], sys.argv[2]
s = open(src).read()
# extern __shared__ [__align__(N)] T x[];  ->  a pointer into the launch's dynamic shared buffer (16-byte aligned).
s = re.sub(r'extern __shared__ (?:__align__\(\d+\) )?(\w+(?: \w+)*) (\w+)\[\];', r'\1* \2 = emu::dyn_smem<\1>();', s)
# nvcuda::wmma comes from wmma_emu.h (included by emu.h).
s = s.replace('#include <mma.h>', '// #include <mma.h>: tools/cuda_emu/wmma_emu.h')
s = s.replace('#include <cuda_pipeline.h>', '// #include <cuda_pipeline.h>: tools/cuda_emu/emu.h')
def launch(m):
    name, cfg = m.group(1), m.group(2)
    return f'emu::launch(emu::Cfg({cfg}), [&](auto... a_) {{ {name}(a_...); }}, '
s, n = re.subn(r'([\w:]+(?:<[\w:, ]+>)?)<<<(.+?)>>>\(', launch, s)
os.makedirs(os.path.dirname(dst), exist_ok=True)
# Rewrite only on change, so run.sh's timestamp check recompiles only what changed.
if not os.path.exists(dst) or open(dst).read() != s:
    open(dst, 'w').write(s)
print(src, n, 'launches', file=sys.stderr)
