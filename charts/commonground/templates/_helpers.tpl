{{/* Names, labels and shared fragments. */}}

{{- define "commonground.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "commonground.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>"; call with (dict "root" $ "component" "controller"). */}}
{{- define "commonground.componentName" -}}
{{- printf "%s-%s" (include "commonground.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "commonground.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "commonground.selectorLabels" -}}
app.kubernetes.io/name: {{ include "commonground.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "commonground.labels" -}}
helm.sh/chart: {{ include "commonground.chart" .root }}
{{ include "commonground.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: commonground
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* Labels of objects that belong to no single component (the key Secret, the dashboard). */}}
{{- define "commonground.commonLabels" -}}
helm.sh/chart: {{ include "commonground.chart" . }}
app.kubernetes.io/name: {{ include "commonground.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: commonground
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "commonground.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* ServiceAccount name of a component; call with (dict "root" $ "component" "agent"). */}}
{{- define "commonground.serviceAccountName" -}}
{{- $sa := (index .root.Values .component).serviceAccount -}}
{{- if $sa.create -}}
{{- default (include "commonground.componentName" .) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{/* The --distances flag value: "a:b=10,a:c=20" (keys sorted, so renders are stable). */}}
{{- define "commonground.distances" -}}
{{- $pairs := list -}}
{{- range $k, $v := .Values.global.distances -}}
{{- $pairs = append $pairs (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{- define "commonground.clusterKeySecretName" -}}
{{- default (printf "%s-cluster-key" (include "commonground.fullname" .)) .Values.clusterKey.existingSecret -}}
{{- end -}}

{{- define "commonground.extenderTlsSecretName" -}}
{{- if .Values.extender.tls.existingSecret -}}
{{- .Values.extender.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-tls" (include "commonground.componentName" (dict "root" . "component" "extender")) -}}
{{- end -}}
{{- end -}}

{{- define "commonground.extenderUrlPrefix" -}}
{{- if .Values.extender.scheduler.urlPrefix -}}
{{- .Values.extender.scheduler.urlPrefix -}}
{{- else -}}
{{- printf "%s://%s.%s.svc:%v" (ternary "https" "http" .Values.extender.tls.enabled) (include "commonground.componentName" (dict "root" . "component" "extender")) .Release.Namespace .Values.extender.port -}}
{{- end -}}
{{- end -}}

{{/* The restricted container securityContext shared by controller and extender. */}}
{{- define "commonground.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
The `extenders:` entry of a KubeSchedulerConfiguration that calls the commonground extender.
Call with (dict "root" $ "managedResources" LIST): with a list, only pods requesting one of
those resources reach the extender; with an empty list, every pod the scheduler schedules.
*/}}
{{- define "commonground.schedulerExtenders" -}}
{{- $root := .root -}}
{{- $s := $root.Values.extender.scheduler -}}
extenders:
  - urlPrefix: {{ include "commonground.extenderUrlPrefix" $root | quote }}
    filterVerb: filter
    prioritizeVerb: prioritize
    weight: {{ $s.weight }}
    # Node names only: the extender keeps its own watch-fed node cache (as in
    # deploy/scheduler/kube-scheduler-config.yaml).
    nodeCacheCapable: true
    enableHTTPS: {{ $root.Values.extender.tls.enabled }}
    {{- if and $root.Values.extender.tls.enabled $s.caData }}
    tlsConfig:
      caData: {{ $s.caData | b64enc | quote }}
    {{- end }}
    httpTimeout: {{ $s.httpTimeout }}
    ignorable: {{ $s.ignorable }}
    {{- with .managedResources }}
    managedResources:
      {{- range . }}
      - name: {{ . | quote }}
        ignoredByScheduler: false
      {{- end }}
    {{- end }}
{{- end -}}
