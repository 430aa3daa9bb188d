"""The networks and their files: MeshNet (`meshnet`), checkpoints (`weights`), brainchop's
TF.js models (`tfjs`), named models (`catalog`) and ONNX export (`export`)."""
