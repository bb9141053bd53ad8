"""Lab: several gridvm hosts simulated on one machine in network namespaces."""
