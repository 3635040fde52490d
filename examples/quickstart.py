"""Convert a timm model, check it, and run one local-learning step (the README's example)."""

import torch
import timm

from auglocal_fx import to_local

torch.manual_seed(0)

model = timm.create_model("regnetx_004", num_classes=10)  # random weights: nothing downloaded
local = to_local(model, d=6, input_size=(3, 64, 64))
print(f"LocalNet({local.extra_repr()})")
print("blocks:", len(local.blocks), "aux nets:", len(local.aux), "output module from block", local.num_local - 1)
print("aux 0 copies blocks", local.plan[0].selected, "with strides", local.plan[0].strides)

x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
model.eval(), local.eval()
print("eval output equal to the original:", torch.equal(local(x), model(x)))

local.train()
opt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
losses = local.train_step(x, y)  # every local loss back-propagated, block by block
opt.step()
opt.zero_grad()
print("losses (local..., output):", [round(v, 3) for v in losses.tolist()])

trained = local.export()  # the original model object, with the trained weights
fresh = timm.create_model("regnetx_004", num_classes=10)
fresh.load_state_dict(trained.state_dict(), strict=True)
