"""QuantLab: measure how quantizing a Keras model for TensorFlow Lite trades size, speed and accuracy.

The package never imports Streamlit, and imports TensorFlow only inside the functions that need it,
so listing techniques, reading the store and serving cached results stay fast.
"""

__version__ = "0.1.0"
