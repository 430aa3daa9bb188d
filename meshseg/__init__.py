"""meshseg: chronic stroke lesion segmentation on T2-weighted MRI with MeshNet."""

__version__ = "0.1.0"
