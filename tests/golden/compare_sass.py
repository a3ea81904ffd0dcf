"""Compare two cuobjdump -sass dumps function by function, ignoring the anonymous-namespace hash
that nvcc puts in the mangled names (it changes with the file's contents) and the instruction
addresses. Prints per-arch counts and any differing function."""
import re, sys
ANON = re.compile(r"\d+_GLOBAL__N__[0-9a-f]+_\d+_kendall_cuda_cu_[0-9a-f]+_\d+")
def funcs(path):
    out, cur, arch = {}, None, None
    for line in open(path):
        line = ANON.sub("ANON", line)
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m: arch = m.group(1)
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = (arch, m.group(1)); out[cur] = []; continue
        if cur and re.match(r"\s*/\*[0-9a-f]{4}\*/", line):
            out[cur].append(re.sub(r"/\*[0-9a-f]{4}\*/", "", line).split(";")[0].strip())
    return out
old, new = funcs(sys.argv[1]), funcs(sys.argv[2])
print("functions:", len(old), "old,", len(new), "new; same names:", set(old) == set(new))
same = sum(old[k] == new[k] for k in old if k in new)
print("identical instruction streams:", same, "of", len(old), "; instructions:", sum(map(len, old.values())))
for k in old:
    if k in new and old[k] != new[k]: print("DIFFERS:", k)
