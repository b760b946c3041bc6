"""Weights from PyTorch files, read without torch.

  pth             `.pth` (`torch.save` zip archive) files read without torch and
                  without running pickled code: the one reader behind both imports
  imagenet        ImageNet-pretrained MiT / SegFormer encoders (three namings)
  authors         the FGTBT authors' released checkpoint: read, name map, conversion
  import_authors  an authors' checkpoint written as a run directory (and its command)
"""
