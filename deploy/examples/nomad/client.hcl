# Nomad client settings for the CNI network in ipam-da-consul.conflist (an example, not tested
# here). Both values below are Nomad's defaults, written out so the paths are explicit:
#   cni_path        where the plugins live: bridge and portmap (containernetworking-plugins)
#                   and ipam-da-consul (the single file, deploy/examples/install.sh)
#   cni_config_dir  where Nomad reads network configurations; the file's "name" is what a job
#                   asks for with network { mode = "cni/<name>" }
client {
  enabled        = true
  cni_path       = "/opt/cni/bin"
  cni_config_dir = "/opt/cni/config"
}
