"""Everything that touches TensorFlow: tf.data, networks, losses, distribution, training, the bundle."""
