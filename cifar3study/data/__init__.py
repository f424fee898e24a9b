"""Getting CIFAR-10 and CIFAR-3: download, archive checks, safe unpickling, split files."""
