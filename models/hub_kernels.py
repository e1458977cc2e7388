"""transformers 5 swaps a model's layers for "hub kernels" (compiled code that the `kernels` package fetches from
Hub repositories such as kernels-community/activation) by default, once the model trains or runs on CUDA.
That is code from outside the checkpoint that the user never asked for, as trust_remote_code would be; and
offline (HF_HUB_OFFLINE=1, a cluster without internet) it stops the run at the first `model.train()`. Every
transformers model CycleTune loads passes these arguments, so the layers are the library's own torch code
on every device."""

WITHOUT_HUB_KERNELS = {"use_kernels": False}
