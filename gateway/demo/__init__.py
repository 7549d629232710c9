"""The simulated pump plant, demo orchestration and the shipped demo model."""
