"""Ways into other training code: a sampler for your own ``DataLoader`` (:mod:`trainer.integrations.sampler`),
PyTorch Lightning (:mod:`trainer.integrations.lightning`) and the Hugging Face ``Trainer``
(:mod:`trainer.integrations.hf`). Importing this package imports neither Lightning nor transformers."""
