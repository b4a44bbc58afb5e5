"""Class names, in the order of the model's output."""
CLASS_NAMES = ("normal", "bacterial", "viral")
