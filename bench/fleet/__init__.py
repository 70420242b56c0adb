"""The fleet benchmark: edged devices in network namespaces, a clustered central broker, faults."""
