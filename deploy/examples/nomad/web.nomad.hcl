# A job on the "consulnet" CNI network (nomad/ipam-da-consul.conflist). An example, not tested
# here. Nomad runs the conflist with CNI_CONTAINERID set to the allocation ID and passes
# NOMAD_REGION, NOMAD_NAMESPACE, NOMAD_JOB_ID, NOMAD_GROUP_NAME and NOMAD_ALLOC_ID in CNI_ARGS;
# ipam-da-consul records them, so
#   ipam-da-consul-admin ip-of web/frontend     (job/group)
#   ipam-da-consul-admin ip-of <alloc ID or a prefix of 6+ characters>
# find the group's address. Nomad never calls CNI GC: run `reconcile` with the node's
# allocation IDs (docs/operations.md, "Reconciling with the runtime").
job "web" {
  group "frontend" {
    network {
      mode = "cni/consulnet"
      port "http" {
        to = 8080
      }
    }

    task "server" {
      driver = "docker"
      config {
        image   = "busybox:1.36"
        command = "httpd"
        args    = ["-f", "-p", "8080", "-h", "/local"]
        ports   = ["http"]
      }
    }
  }
}
