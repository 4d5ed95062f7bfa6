{{/* Chart name, truncated to 63 characters. */}}
{{- define "causeway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, with the chart name unless it already holds it. */}}
{{- define "causeway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "causeway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "causeway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "controller"). */}}
{{- define "causeway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "causeway.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "causeway.controller.fullname" -}}
{{- printf "%s-controller" (include "causeway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "causeway.agent.fullname" -}}
{{- printf "%s-agent" (include "causeway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "causeway.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (include "causeway.controller.fullname" .) .Values.controller.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "causeway.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "causeway.agent.fullname" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespace of the leader-election Lease. */}}
{{- define "causeway.leaseNamespace" -}}
{{- default .Release.Namespace .Values.controller.leaderElection.namespace }}
{{- end }}

{{- define "causeway.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The agent's arguments (the list items), shared by the agent and its
init container. Pass the root context. */}}
{{- define "causeway.agent.args" -}}
{{- $a := .Values.agent -}}
- run
- --iptables-backend={{ $a.iptablesBackend }}
- --sync-period={{ $a.syncPeriod }}
- --min-sync-period={{ $a.minSyncPeriod }}
{{- with $a.clusterCIDRs }}
- --cluster-cidr={{ join "," . }}
{{- end }}
- --detect-local-mode={{ $a.detectLocalMode }}
{{- with $a.podBridgeInterface }}
- --pod-bridge-interface={{ . }}
{{- end }}
{{- with $a.podInterfaceNamePrefix }}
- --pod-interface-name-prefix={{ . }}
{{- end }}
- --masquerade-all={{ $a.masqueradeAll }}
- --masquerade-bit={{ $a.masqueradeBit }}
{{- with $a.nodePortAddresses }}
- --nodeport-addresses={{ join "," . }}
{{- end }}
- --localhost-nodeports={{ $a.localhostNodePorts }}
- --healthz-bind-address=0.0.0.0:{{ $a.healthPort }}
- --metrics-bind-address={{ $a.metricsBindAddress }}
{{- if $a.logJson }}
- --log-json
{{- end }}
{{- range $a.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The agent's environment (the list items), shared by the agent and its
init container. Pass the root context. */}}
{{- define "causeway.agent.env" -}}
{{- $a := .Values.agent -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- with $a.apiServer.host }}
# The API server itself, not the kubernetes Service's ClusterIP, which only
# works once a service proxy (this agent) has programmed it.
- name: KUBERNETES_SERVICE_HOST
  value: {{ . | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ $a.apiServer.port | quote }}
{{- end }}
{{- with $a.logLevel }}
- name: RUST_LOG
  value: {{ . | quote }}
{{- end }}
{{- with $a.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* "true" when agent.metricsBindAddress is a loopback address (127.*,
[::1] in any spelling, localhost), which nothing outside the node can scrape;
empty otherwise. */}}
{{- define "causeway.agent.metricsOnLoopback" -}}
{{- if regexMatch `^(127\.|\[[0:]*:0*1\]:|localhost:)` .Values.agent.metricsBindAddress }}true{{ end }}
{{- end }}
