"""DVC stages of the CIFAR-3 FC-vs-CNN pipeline; one module per stage."""
