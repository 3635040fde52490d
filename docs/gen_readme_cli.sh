#!/bin/bash
# Regenerate docs/readme_cli.md (every command output in it is real) and its two figures.
# Usage, from the repository root with the virtual environment active:
#   bash docs/gen_readme_cli.sh        (about 6 minutes on a busy 2-core CPU)
set -euo pipefail
ROOT=$(pwd)
WORK=$(mktemp -d)
OUT=$WORK/out
mkdir -p "$OUT"
cd "$WORK"
auglocal-fx convert timm:regnetx_004 --d 6 > "$OUT/conv_regnet.txt" 2>&1
auglocal-fx convert paper:resnet32 --d 2 --json -o resnet32_d2.pt | python -c "import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ('model', 'flops', 'params', 'checkpoint')}); print(len(d['blocks']), 'blocks,', len(d['aux_nets']), 'aux nets; aux_nets[0] =', d['aux_nets'][0])" > "$OUT/conv_json.txt" 2>&1
auglocal-fx convert paper:resnet32 --flops-budget 2.5x > "$OUT/conv_budget.txt" 2>&1
python -W ignore -c "
from auglocal_fx.flops import solve_budget
print(solve_budget('paper:resnet110', '1.0G').reason)" > "$OUT/conv_budget110.txt" 2>&1
# The error examples: a model torch.fx cannot trace, and a file that is no checkpoint.
cat > bad.py <<'PY'
import torch
from torch import nn
class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))
def branchy():
    return Branchy()
PY
printf 'garbage' > corrupt.pt
for args in "convert timm:not_a_model_xyz --d 2" "convert foo:bar --d 2" "convert paper:resnet32 --d 1" \
    "convert paper:vgg19 --d 2 --input-size 3 8 8" "convert bad.py:branchy --d 2 --input-size 3 16 16" \
    "blocks corrupt.pt" "convert paper:resnet32 --flops-budget 1.01x"; do
  echo "\$ auglocal-fx $args"; auglocal-fx $args 2>&1 || true
done > "$OUT/errors.txt"
cd "$ROOT"
auglocal-fx report paper:resnet110 --d 2 3 4 5 6 --flops-only > "$OUT/report110.txt" 2>&1
auglocal-fx blocks paper:resnet32 --d 3 --svg docs/blocks_resnet32.png > "$OUT/blocks32.txt" 2>&1
auglocal-fx report paper:resnet32 --d 2 3 4 --batch-size 64 --threads 1 \
    --plot docs/report_resnet32.png > "$OUT/report32.txt" 2>&1
OUT="$OUT" python - <<'PY'
import os
out = os.environ["OUT"]
s = open("docs/readme_cli.template.md").read()
r = lambda f: open(os.path.join(out, f)).read().rstrip("\n")
for f, ph in [("conv_regnet.txt", "{conv_regnet}"), ("conv_json.txt", "{conv_json}"),
              ("conv_budget.txt", "{conv_budget}"), ("report110.txt", "{report110}"),
              ("blocks32.txt", "{blocks32}"), ("report32.txt", "{report32}"),
              ("conv_budget110.txt", "{budget110}")]:
    s = s.replace(ph, r(f))
start = s.index("$ auglocal-fx convert timm:not_a_model_xyz --d 2")
end = s.index("```", start)
s = s[:start] + r("errors.txt") + "\n" + s[end:]
open("docs/readme_cli.md", "w").write(s)
PY
rm -rf "$WORK"
echo "docs/readme_cli.md, docs/report_resnet32.png and docs/blocks_resnet32.png regenerated"
