"""Trainable architectures, one file per architecture (PDN, FPN decoder, autoencoders, flows ...).

Each is a plain `torch.nn.Module` built from JSON-safe arguments; pretrained parts come from
`defectlens.backbones` through `networks.encoder.PretrainedEncoder`.
"""
