{{/*
The names of every object start with this: the release name when it contains the chart's name
("detour"), else <release>-detour; fullnameOverride replaces it.
*/}}
{{- define "detour.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "detour.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The labels that select a component's pods: (list $ "proxy"). */}}
{{- define "detour.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/name: {{ include "detour.name" $root }}
{{- end -}}

{{/* An object's labels: its component's (list $ "proxy"; "" for none), and the chart's. */}}
{{- define "detour.labels" -}}
{{- $root := index . 0 -}}
{{- if index . 1 -}}
{{ include "detour.selectorLabels" . }}
{{ end -}}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: {{ include "detour.name" $root }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "detour.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* image: and, when set, imagePullPolicy: of a container. */}}
{{- define "detour.imageFields" -}}
image: {{ include "detour.image" . }}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end -}}

{{/* detour.yaml as the ConfigMap holds it. */}}
{{- define "detour.config" -}}
{{ toYaml .Values.config }}
{{- end -}}

{{/*
The cluster tier's environment: peers are the headless Service (list $ "<service>"), resolved in
the pod's own namespace; advertise is the pod's own IP and container port. Kubernetes expands
$(VAR) from the entries above it.
*/}}
{{- define "detour.clusterEnv" -}}
{{- $root := index . 0 -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      apiVersion: v1
      fieldPath: status.podIP
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      apiVersion: v1
      fieldPath: metadata.namespace
- name: PEERS_SERVICE
  value: {{ index . 1 }}
- name: DETOUR_CLUSTER__PEERS
  value: dns:$(PEERS_SERVICE).$(POD_NAMESPACE).svc:7439
- name: DETOUR_CLUSTER__ADVERTISE
  value: $(POD_IP):7439
- name: DETOUR_CLUSTER__REFRESH
  value: {{ $root.Values.cluster.refresh | quote }}
{{- end -}}

{{/* The proxy's own Prometheus scrape rule of a NetworkPolicy (port 7439). */}}
{{- define "detour.prometheusIngress" -}}
- from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ .Values.networkPolicy.prometheusNamespace }}
      podSelector:
        matchLabels:
          {{- toYaml .Values.networkPolicy.prometheusPodLabels | nindent 10 }}
  ports:
    - port: 7439
      protocol: TCP
{{- end -}}

{{/* The pod securityContext of every Detour pod; fsGroup where a volume needs it. */}}
{{- define "detour.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "detour.containerSecurity" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The probes of a proxy or hub container; (list $ "127.0.0.1") adds the host. */}}
{{- define "detour.httpProbes" -}}
{{- $host := index . 1 -}}
readinessProbe:
  # 503 while the cache directory is not writable: then out of the peer set.
  httpGet:
    path: /readyz
    port: http
    {{- with $host }}
    host: {{ . }}
    {{- end }}
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 3
livenessProbe:
  httpGet:
    path: /healthz
    port: http
    {{- with $host }}
    host: {{ . }}
    {{- end }}
  initialDelaySeconds: 5
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
{{- end -}}

{{/* The peers' shared secret, where config.cluster.secret_dir looks (optional: it may come later). */}}
{{- define "detour.peerSecretMount" -}}
{{- with (.Values.config.cluster | default dict).secret_dir }}
- name: peer-secret
  mountPath: {{ . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "detour.peerSecretVolume" -}}
{{- if (.Values.config.cluster | default dict).secret_dir }}
- name: peer-secret
  secret:
    secretName: {{ include "detour.fullname" . }}-peer-secret
    optional: true
{{- end }}
{{- end -}}
