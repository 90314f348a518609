"""Real-component test harness: a local Kubernetes control plane, MinIO and a pod runner."""
