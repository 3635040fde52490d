"""The authors' ResNet-32 with a comparison rule, as their train.py and run.sh build it (shared by
``accuracy.py`` and ``reference_steps.py``; the authors' code comes from ``--reference``)."""

from unittest import mock

import torch

RULES = {"dgl": "DGL", "predsim": "PredSim", "infopro": "InfoPro"}
# The authors' run.sh for ResNet-32: (ixx_1, ixy_1, ixx_2, ixy_2).
LOSS_WEIGHTS = {"dgl": (0.0, 1.0, 0.0, 1.0), "predsim": (0.99, 0.01, 0.99, 0.01),
                "infopro": (5.0, 0.05, 0.2, 0.5)}


def rule_resnet32(reference, rule: str, batch_size: int, image_size: int):
    """``LocalResNet`` with 16 local modules and ``rule``'s auxiliary networks, on the CPU.

    Their train.py: the baselines train all 16 blocks locally; InfoPro's decoder is '2c'. Their
    PredSim sizes its pooling by image_size (they accept 32 and 96 only); their InfoPro builds
    CUDA tensors (kept on the CPU here) and undoes CIFAR statistics (given Fashion-MNIST's).
    """
    with mock.patch.object(torch.Tensor, "cuda", lambda tensor, *a, **k: tensor):
        model = reference.resnet32(local_module_num=16, batch_size=batch_size, image_size=image_size,
                                   dataset="fashion-mnist", class_num=10, aux_net_config=RULES[rule],
                                   aux_net_config_aux_loss="2c", rule=RULES[rule], hidden_dim=512,
                                   aux_net_feature_dim=128)
    if rule == "infopro":
        from auglocal_fx.data import _MEAN_STD

        mean, std = _MEAN_STD["fashion-mnist"]
        size = (batch_size, len(mean), image_size, image_size)
        model.mask_train_mean = torch.tensor(mean).view(1, -1, 1, 1).expand(*size)
        model.mask_train_std = torch.tensor(std).view(1, -1, 1, 1).expand(*size)
    return model
