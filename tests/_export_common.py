"""What the export tests (``tests/test_export*.py``) share: the heatmap tolerance."""

# Heatmap tolerance. Both int8 models quantize the feature map to 8 bits (steps of about 1/255 of its
# calibrated range) after two int8 convolutions; on this 32-channel model (calibrated on 3 images) the
# class-activation maps (0..1) differ from the Keras float ones by at most 0.009 on average and 0.125 in the
# worst cell (both engines, measured per class). Wrong outputs, measured on the same model: a transposed map
# 0.127-0.168 on average, another class's map 0.21-0.27, the negated map 0.32-0.38, each 1.0 in the worst cell.
CAM_MEAN_TOL, CAM_MAX_TOL = 0.02, 0.25
